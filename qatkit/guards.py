"""Guards: the doctor's rules run inside the workflow, at the moment a mistake happens.

``prepare``, ``set_fake_quantize``, calibration, ``convert`` and ``evaluate`` build a
:class:`~qatkit.rules.Context` for their stage and call :func:`check`: error-level findings
raise :class:`QatkitError`, warning-level findings warn with :class:`QatkitWarning` (errors in
strict mode), silenced findings are logged for the report.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from qatkit.errors import QatkitError, silenced_log, warn
from qatkit.march import March
from qatkit.rules import Context, Finding, run


def context(model: nn.Module, stage: str, march: March | None = None, graph: Any = None,
            example_inputs: Any = None, **kw: Any) -> Context:
    return Context(model=model, stage=stage, march=march, graph=graph,
                   example_inputs=example_inputs, **kw)


def check(ctx: Context, codes: Any = None) -> list[Finding]:
    """Run the rules of ``ctx.stage``; raise on the first error, warn on warnings."""
    findings = list(run(ctx, codes))
    errors = [f for f in findings if f.severity == "error" and f.silenced is None]
    if errors:
        first = errors[0]
        more = f" ({len(errors) - 1} more error(s): run qk.doctor.check for all)" \
            if len(errors) > 1 else ""
        raise QatkitError(first.code, _where(first) + first.message + more, first.fix)
    for f in findings:
        if f.silenced is not None:
            silenced_log.append((f.code, f.module, f.silenced))
        elif f.severity == "warning":
            warn(f.code, _where(f) + f.message, f.fix, stacklevel=4)
    return findings


def _where(f: Finding) -> str:
    if not f.module:
        return ""
    return f"module '{f.module}'" + (f" ({f.source})" if f.source else "") + ": "


def on_set_state(model: nn.Module, state: Any) -> None:
    """Checks when fake-quant state changes (march consistency, multi-device calibration)."""
    from qatkit import meta
    from qatkit.march import get_march
    m = meta.get(model)
    ctx = context(model, "calibration" if state.name == "CALIBRATION" else state.name.lower(),
                  get_march(), extra={"state": state, "recorded_march": m.march if m else None})
    check(ctx)
