"""QK103: NaN/Inf in what the observers saw, or in the weights.

Observers count the non-finite values they are shown (``observer.nonfinite``) and compute
their range from the finite ones. Some NaN/Inf (a bad batch, an overflow in float16
pre-processing) leave a usable but suspect range: warning. An observer that saw only NaN/Inf
has no range at all, and NaN/Inf weights cannot be quantized: error.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import owner_name, plural, region
from qatkit.quantization.fake_quant import FakeQuantize, FakeQuantState, fake_quants


def _at_calibration_end(ctx: Context, fqs: list[tuple[str, FakeQuantize]]) -> bool:
    # Guards run when the state changes: report when calibration ends (or at convert, or in
    # the doctor), not again at every later QAT/VALIDATION switch.
    if ctx.stage == "convert" or ctx.extra.get("doctor"):
        return True
    return any(fq.state is FakeQuantState.CALIBRATION for _, fq in fqs)


def _weights(ctx: Context) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Weights of the modules that will be quantized (in the region when a graph is known)."""
    names: set[str] | None = None
    if ctx.graph is not None:
        reg = region(ctx)
        names = {n.target for n in ctx.graph.nodes if n.index in reg and n.module is not None}
    for name, mod in ctx.model.named_modules():
        if names is not None and name not in names:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.is_floating_point():
                yield name, pname, p


def _flow_order(ctx: Context, names: list[str]) -> list[str]:
    """``names`` in data-flow order when a trace is known (NaN spreads downstream: the first
    observer that saw it is nearest to where it came from), else in module order."""
    if ctx.graph is None:
        return names
    first: dict[str, int] = {}
    for n in ctx.graph.nodes:
        first.setdefault(n.target, n.index)
    return sorted(names, key=lambda x: first.get(x, len(ctx.graph.nodes)))


def _check(ctx: Context) -> Iterator[Finding]:
    fqs = [(n, fq) for n, fq in fake_quants(ctx.model) if not fq.is_weight]
    if fqs and _at_calibration_end(ctx, fqs):
        partial: dict[str, tuple[int, int]] = {}
        for name, fq in fqs:
            obs = fq.observer
            bad, total = int(obs.nonfinite), int(obs.count)
            if bad <= 0:
                continue
            owner = owner_name(name)
            if bad < total:
                partial[owner] = (bad, total)
                continue
            yield RULE.finding(
                owner, f"the observer of '{owner}' saw only NaN/Inf ({plural(bad, 'value')}): "
                "it has no range, so the op has no usable scale.",
                fix="find where NaN/Inf first appear (run the float model on the same batches "
                    "and check each layer's output), fix the data or the float model, then "
                    "calibrate again", severity="error")
        if partial:
            order = _flow_order(ctx, list(partial))
            first, rest = order[0], order[1:]
            bad, total = partial[first]
            more = ""
            if rest:
                shown = ", ".join(f"'{r}' ({100.0 * partial[r][0] / partial[r][1]:.3g}%)"
                                  for r in rest[:5])
                more = (f" {len(rest)} later observer(s) saw NaN/Inf too: {shown}"
                        + (", ..." if len(rest) > 5 else "") + ".")
            yield RULE.finding(
                first, f"the observer of '{first}' saw {bad:,} NaN/Inf values out of {total:,} "
                f"({100.0 * bad / total:.3g}%): its range comes from the finite values only, "
                f"and the model produces NaN/Inf on some inputs.{more}")
    with torch.no_grad():
        for name, pname, p in _weights(ctx):
            if bool(torch.isfinite(p.sum())):  # NaN/Inf propagate into the sum: one cheap pass
                continue
            bad = int((~torch.isfinite(p)).sum())
            if bad:
                yield RULE.finding(
                    name, f"parameter '{name}.{pname}' has {bad:,} NaN/Inf values out of "
                    f"{p.numel():,}: it cannot be quantized.",
                    fix="training diverged or a checkpoint is corrupt: restore finite weights "
                        "(lower learning rate, gradient clipping) before calibration/QAT",
                    severity="error")


RULE = Rule(
    code="QK103",
    name="NaN/Inf in statistics",
    severity="warning",
    stages=("float", "calibration", "qat", "validation", "convert"),
    summary="Reports observers that saw NaN/Inf values (when calibration ends, at convert and "
            "in the doctor), and parameters of quantized modules that are NaN/Inf. Warning when "
            "part of the data was non-finite, error when all of it was or a weight is.",
    why="A NaN/Inf in calibration data means the float model overflows or the data pipeline is "
        "broken on some inputs; the scale then comes from the rest of the data only, and the "
        "fixed-point model saturates where the float model produced Inf. An observer that saw "
        "only NaN/Inf has no scale at all.",
    bad="""
data = [xb.clone() for xb, _ in train_batches[:8]]
data[3][5, 0, 2, 2] = float("nan")           # a corrupt image from the data pipeline
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, data)  # [QK103] module 'quant': the observer of 'quant' saw 1 NaN/Inf values
""",
    good="""
data = [xb.clone() for xb, _ in train_batches[:8]]
data[3][5, 0, 2, 2] = float("nan")           # a corrupt image from the data pipeline
data = [xb[torch.isfinite(xb).flatten(1).all(1)] for xb in data]  # drop (and log) them
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, data)
""",
    fix="find where NaN/Inf appear (data or float model) and calibrate on finite data only",
    check=_check,
)
