"""QK005: camera input (``input_source="camera"``) that is not centered YUV444 at scale 1/128.

* Error (prepare and later): an input QuantStub (one fed by data that has not passed a
  QuantStub) has no fixed scale 1/128.
* Warning (first calibration batch at each input QuantStub, once): the data do not look
  centered (``qatkit.base.colour.looks_centered``), or they overflow the fixed scale's range,
  or their three channels are all strongly positively correlated, as the R, G and B planes
  of a photo are (pairwise Pearson correlation ~0.35-0.98 on real photos) and centered YUV
  planes are not (U and V are anti-correlated, -0.5..-0.95): RGB normalised to [-1, 1] is
  centered but still RGB.

Camera input is declared (``input_source="camera"``/``"pyramid"``: the rule is certain) or
inferred when it is not declared at all (``"other"`` turns the rule off): an input QuantStub
with the camera's fixed scale 1/128 is the camera convention, and a declared processor (every
BPU processor has the camera/pyramid path) adds to it. Inferred camera input only warns on
data evidence, and the message says what the inference rests on and how sure it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import input_source, qconfigs
from qatkit.quantization import trace as tr

CAMERA_SCALE = 1.0 / 128
# Data reaching more than twice the fixed scale's range (|x| > 2 for 1/128) is not "a few
# outliers": it is raw [-128, 127] YUV fed without the / 128.
_OVERFLOW = 2.0


def input_stub_nodes(g: tr.Graph) -> list[tr.Node]:
    """QuantStub calls fed by data that has not passed a QuantStub (the model's inputs)."""
    from qatkit.fixed_point.modules import QQuantStub
    from qatkit.quantization.stubs import QuantStub
    pre = tr.float_nodes_before_quant(g)
    return [n for n in g.nodes if isinstance(n.module, (QuantStub, QQuantStub))
            and any(i in pre for i in n.inputs)]


def _stubs(ctx: Context) -> list[tuple[str, nn.Module, str]]:
    if ctx.graph is not None:
        return [(n.target, n.module, n.source) for n in input_stub_nodes(ctx.graph)
                if n.call == 0]
    return [(name, m, "") for name, m in ctx.model.named_modules()
            if getattr(m, "_qatkit_input_stub", False)]


def stub_scale(ctx: Context, name: str, stub: nn.Module) -> float | None:
    """The fixed input scale of a QuantStub in any form, None when calibrated."""
    from qatkit.fixed_point.modules import QQuantStub
    from qatkit.quantization.fake_quant import FakeQuantize
    if isinstance(stub, QQuantStub):
        return float(stub.out_scale)
    app = getattr(stub, "activation_post_process", None)
    if isinstance(app, FakeQuantize):
        return app.observer.fixed_scale if app.fixed else None
    if getattr(stub, "scale", None) is not None:
        return float(stub.scale)
    q = qconfigs(ctx).get(name)
    return q.activation.fixed_scale if q is not None and q.activation is not None else None


def _scale_findings(ctx: Context) -> Iterator[Finding]:
    for name, stub, src in _stubs(ctx):
        s = stub_scale(ctx, name, stub)
        if s is not None and abs(s - CAMERA_SCALE) <= 1e-9:
            continue
        have = "a scale calibrated from data" if s is None else f"fixed scale {s:g}"
        yield RULE.finding(name, f"the model input is declared to come from the camera/pyramid "
                           f"(centered YUV444, int8 = YUV - 128) but this input QuantStub has "
                           f"{have} instead of the fixed scale 1/128, so the deployed model "
                           "would read the camera's bytes with another scale than training.",
                           source=src)


# RGB: all three pairwise channel correlations at least this, and their mean at least _RGB_MEAN
_RGB_PAIR, _RGB_MEAN = 0.3, 0.6


def channel_correlations(x: torch.Tensor) -> list[float] | None:
    """The pairwise Pearson correlations (01, 02, 12) of the channels of an N,3,H,W batch."""
    if x.dim() != 4 or x.shape[1] != 3 or x[0, 0].numel() < 16:
        return None
    c = x.detach().to(torch.float64).transpose(0, 1).reshape(3, -1)
    c = c - c.mean(1, keepdim=True)
    norm = c.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        return None
    m = (c / norm) @ (c / norm).T
    return [float(m[0, 1]), float(m[0, 2]), float(m[1, 2])]


def looks_rgb(x: torch.Tensor) -> str | None:
    """Why ``x`` looks like RGB/BGR planes, or None."""
    r = channel_correlations(x)
    if r is None or min(r) < _RGB_PAIR or sum(r) / 3 < _RGB_MEAN:
        return None
    return ("its three channels are all strongly positively correlated (pairwise "
            f"{', '.join(f'{v:.2f}' for v in r)}), as the R, G and B planes of a photo are; "
            "centered YUV planes are not (U and V are anti-correlated)")


def camera_evidence(ctx: Context, scale: float | None) -> tuple[str, list[str]] | None:
    """(how sure, reasons) that an input is fed by the camera path, or None (no reason)."""
    from qatkit.quantization import meta
    facts = meta.get(ctx.model) if ctx.model is not None else None
    return evidence(input_source(ctx), ctx.processor or (facts.processor if facts else None),
                    scale)


def evidence(source: str | None, processor: str | None, scale: float | None
             ) -> tuple[str, list[str]] | None:
    """:func:`camera_evidence` from the declared facts and the input QuantStub's scale."""
    if source in ("camera", "pyramid"):
        return "certain", [f"input_source={source!r} was declared"]
    if source == "other" or scale is None or abs(scale - CAMERA_SCALE) > 1e-9:
        return None
    reasons = ["the input QuantStub has the camera's fixed scale 1/128"]
    if processor:
        reasons.append(f"the target processor {processor} has the camera/pyramid input path")
    return ("likely" if processor else "possible"), reasons


def data_findings(name: str, x: Any, scale: float | None,
                  evidence: tuple[str, list[str]] | None = None) -> Iterator[Finding]:
    """Warnings for calibration data ``x`` as they reach input QuantStub ``name``."""
    from qatkit.base.colour import looks_centered
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return
    how, why = evidence or ("certain", [])
    said = "" if not why or how == "certain" else (
        f" (camera input inferred, {how}: {'; '.join(why)}; declare input_source='other' "
        "if the model is not fed by the camera)")
    try:
        ok, reason = looks_centered(x)
    except ValueError:  # not an N,C,H,W image batch, or non-finite values (QK103's job)
        return
    rgb = looks_rgb(x) if ok else None
    if rgb is not None:
        ok, reason = False, rgb
    if not ok:
        yield RULE.finding(name, f"calibration data at this input QuantStub do not look like "
                           f"centered YUV444: {reason}.{said}", severity="warning",
                           fix="feed camera-format data from the start of training: "
                               "qatkit.base.colour.rgb_to_yuv444(rgb_uint8, centered=True) / 128 "
                               "(values in [-1, 1), read by QuantStub(scale=1/128))")
        return
    peak = float(x.detach().abs().max())
    if scale is not None and peak > _OVERFLOW * 128 * scale:
        yield RULE.finding(name, f"calibration data reach |x| = {peak:g} but the input "
                           f"QuantStub's fixed scale {scale:g} holds only about "
                           f"+-{128 * scale:g}: nearly every value would saturate.",
                           severity="warning",
                           fix="divide centered YUV444 ([-128, 127]) by 128 before the model "
                               "(qatkit.base.colour.rgb_to_yuv444(rgb, centered=True) / 128)")


def _inputs_by_node(ctx: Context, inputs: Any = None) -> dict[int, Any]:
    flat: list[Any] = []
    tr._walk(ctx.calibration_inputs if inputs is None else inputs, flat.append)
    inputs = [n for n in ctx.graph.nodes if n.kind == "input"]
    return {n.index: t for n, t in zip(inputs, flat)}


SOURCES = ("camera", "pyramid", "other")  # camera and pyramid both deliver centered YUV444


def _check(ctx: Context) -> Iterator[Finding]:
    source = input_source(ctx)
    if source is not None and source not in SOURCES:  # a typo must not switch the rule off
        from qatkit.base.errors import fail
        raise fail("QK000", f"unknown input_source {source!r}.",
                   "use input_source='camera' (or 'pyramid': centered YUV444) or 'other'")
    at_stub = ctx.extra.get("at_stub")
    if at_stub is not None:  # runtime: one batch at one QuantStub
        scale = ctx.extra.get("stub_scale")
        ev = ctx.extra.get("evidence") or camera_evidence(ctx, scale)
        if ev is not None:
            yield from data_findings(at_stub, ctx.calibration_inputs, scale, ev)
        return
    if source in ("camera", "pyramid"):
        yield from _scale_findings(ctx)
    if ctx.graph is None:
        return
    data = _inputs_by_node(ctx) if ctx.calibration_inputs is not None else {}
    if not data and source not in ("camera", "pyramid") and ctx.example_inputs is not None \
            and ctx.extra.get("doctor"):
        data = _inputs_by_node(ctx, ctx.example_inputs)  # inferred camera: the example batch
    for n in input_stub_nodes(ctx.graph):
        x = next((data[i] for i in n.inputs if i in data), None)
        scale = stub_scale(ctx, n.target, n.module)
        ev = camera_evidence(ctx, scale)
        if x is not None and ev is not None:
            yield from data_findings(n.target, x, scale, ev)


RULE = Rule(
    code="QK005",
    name="centered-yuv-input",
    severity="error",
    stages=("float", "prepare", "calibration", "qat", "validation", "converted"),
    summary=(
        "For a model declared to take camera/pyramid input (prepare(..., "
        "input_source='camera')): the input QuantStub must have the fixed scale 1/128 "
        "(error), and calibration data reaching it must look like centered YUV444 / 128: both "
        "signs in bulk, luma not left in [0, 255], no [0, 1] or [0, 255] RGB/BGR (warning, "
        "checked on the first calibration batch)."),
    why=(
        "The BPU's camera path delivers centered YUV444 (BT.601 full swing, YUV - 128, int8) "
        "and the input QuantStub reads those bytes with scale 1/128. A model trained on RGB, "
        "or on uncentered YUV, or with a calibrated input scale, sees different numbers on the "
        "board than in training: the deployed accuracy silently drops."),
    bad="""
from skimage import data

photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)      # RGB uint8, 3 x 512 x 512
tiles = photo.unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, -1, 8, 8).transpose(0, 1)
rgb = tiles.float() / 255                                        # RGB in [0, 1]
calib = qk.prepare(Net(channels=3, input_scale=1 / 128), rgb[:8], input_source="camera",
                   qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, rgb.split(256))        # [QK005] ... do not look like centered YUV444
""",
    good="""
from skimage import data

photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)      # RGB uint8, 3 x 512 x 512
tiles = photo.unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, -1, 8, 8).transpose(0, 1)
yuv = qk.colour.rgb_to_yuv444(tiles, centered=True) / 128        # what the camera delivers
calib = qk.prepare(Net(channels=3, input_scale=1 / 128), yuv[:8], input_source="camera",
                   qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, yuv.split(256))        # train on the same format from the start
""",
    fix="give the input QuantStub scale=1/128 (QuantStub(scale=1/128) or "
        "qk.fixed_scale_qconfig()) and train and calibrate on centered YUV444 / 128 "
        "(qatkit.base.colour.rgb_to_yuv444(..., centered=True) / 128)",
    check=_check,
)
