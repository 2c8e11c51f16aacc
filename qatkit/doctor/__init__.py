"""The doctor: the rules that catch quantization misuses, and where they run.

``rules/`` holds one file per rule (code, detection, message, fix, docs, examples); ``guards``
listens to the workflow's moments and runs the rules of each stage as it happens (errors raise,
warnings warn); ``check`` runs every rule on a model at once and reports (``qk.doctor.check``).
"""

from qatkit.doctor.check import STAGES, Report, check, detect_stage

__all__ = ["STAGES", "Report", "check", "detect_stage"]
