"""Analysis: where accuracy is lost and why.

``compare`` (per-layer agreement of two stages), ``stats`` (per-layer statistics),
``sensitivity`` (which ops to keep in higher precision), ``causes`` (a judgement per layer),
``plots`` and ``report`` (one self-contained HTML + JSON report).
"""
