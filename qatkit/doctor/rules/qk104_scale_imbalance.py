"""QK104: add/sub/cat/stack/maximum/minimum whose input scales differ too much.

Thresholds, from ``docs/fixed-point.md``:

* cat, stack, maximum, minimum (section 8): every input is requantized to the one output scale
  ``s_o``, which calibration sets from the widest input, so ``s_o ~ s_big``. An input of scale
  ``s_small`` keeps ``256 * s_small / s_o`` of the 256 int8 levels. Above a ratio of
  **16** the small input is left with fewer than 16 levels, i.e. under 4 of its 8 bits.
* add, sub (section 6): both operands are first brought to ``s_o / 256``, so the add itself
  loses nothing; the small operand is resolved only by the final rounding to ``s_o``. Its whole
  range then spans ``256 / ratio`` output levels, and its typical values (a fraction of its
  range) a handful. Above **32** the range spans fewer than 8 levels (under 3 bits): the
  branch's contribution is mostly rounding noise.

Scales are those the fixed-point model would use now: calibrated/QAT fake quants of a prepared
model, ``out_scale`` of a converted one. Inputs that are int32 accumulators (conv fused into
the add) or have no scale yet are skipped (QK008 reports the latter).
"""

from __future__ import annotations

from collections.abc import Iterator

from qatkit.base.quant_math import MIN_SCALE
from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import fmt, producer_scale, region

CAT_LIKE_RATIO = 16.0
ADD_LIKE_RATIO = 32.0
_OPS = {"add": ADD_LIKE_RATIO, "add_relu": ADD_LIKE_RATIO, "sub": ADD_LIKE_RATIO,
        "cat": CAT_LIKE_RATIO, "concat": CAT_LIKE_RATIO, "stack": CAT_LIKE_RATIO,
        "maximum": CAT_LIKE_RATIO, "minimum": CAT_LIKE_RATIO}


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    reg = region(ctx)
    for node in g.nodes:
        limit = _OPS.get(node.op)
        if node.kind != "functional" or limit is None or node.index not in reg:
            continue
        found = [producer_scale(ctx, i) for i in node.inputs]
        # A scale at the floor comes from an all-zero range: QK008's degenerate range.
        scales = [s for s in found if s is not None and s[0] > 2 * MIN_SCALE]
        if len(scales) < 2:
            continue
        big, small = max(scales), min(scales)
        ratio = big[0] / small[0]
        if ratio <= limit:
            continue
        levels = 256.0 / ratio
        yield RULE.finding(
            node.target,
            f"{node.op} '{node.target}' combines inputs whose scales differ {ratio:.0f}x "
            f"(limit {limit:.0f}x): '{small[1]}' (scale {fmt(small[0])}) and '{big[1]}' "
            f"(scale {fmt(big[0])}). Requantized to a common output scale, the smaller input "
            f"keeps about {levels:.1f} of its 256 int8 levels.",
            source=node.source)


RULE = Rule(
    code="QK104",
    name="add/cat input scales differ too much",
    severity="warning",
    stages=("calibration", "qat", "validation", "convert", "converted"),
    summary=f"For every FloatFunctional add/sub (limit {ADD_LIKE_RATIO:.0f}x) and "
            f"cat/stack/maximum/minimum (limit {CAT_LIKE_RATIO:.0f}x) in the quantized region, "
            "finds the scale of each input (the fake quant or converted op that produced it, "
            "through ReLU, pooling and reshapes) and warns when the largest is more than the "
            "limit times the smallest. Needs calibrated scales and a traced forward (the "
            "doctor).",
    why="The fixed-point add brings both operands to s_o/256 and rounds the sum to s_o; cat and "
        "maximum/minimum requantize every input to s_o. The output scale follows the widest "
        "input, so an input with a much smaller scale is represented with a few levels only: "
        "with a 16x ratio a cat input keeps 16 of 256 levels (4 bits).",
    bad="""
class Head(nn.Module):                      # learned features and raw pixels, side by side
    def __init__(self):
        super().__init__()
        self.quant, self.quant_px, self.dequant = (qk.QuantStub(), qk.QuantStub(),
                                                   qk.DeQuantStub())
        self.conv, self.pool = nn.Conv2d(1, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        self.cat, self.fc = qk.FloatFunctional(), nn.Linear(8 + 64, 10)

    def forward(self, x):
        feat = self.pool(self.conv(self.quant(x))).flatten(1)   # 8 values, |f| < 0.5
        pixels = self.quant_px(16 * x.flatten(1))   # the dataset's raw levels, 0..16
        return self.dequant(self.fc(self.cat.cat([feat, pixels], 1)))


calib = qk.prepare(Head(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, train_batches[:8])
report = qk.doctor.check(calib, x)          # [QK104] cat 'cat' combines inputs whose scales ...
""",
    good="""
class Head(nn.Module):                      # learned features and raw pixels, side by side
    def __init__(self):
        super().__init__()
        self.quant, self.quant_px, self.dequant = (qk.QuantStub(), qk.QuantStub(),
                                                   qk.DeQuantStub())
        self.conv, self.pool = nn.Conv2d(1, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        self.cat, self.fc = qk.FloatFunctional(), nn.Linear(8 + 64, 10)

    def forward(self, x):
        feat = self.pool(self.conv(self.quant(x))).flatten(1)   # 8 values, |f| < 0.5
        pixels = self.quant_px(x.flatten(1))        # in [0, 1], like the features
        return self.dequant(self.fc(self.cat.cat([feat, pixels], 1)))


calib = qk.prepare(Head(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, train_batches[:8])
report = qk.doctor.check(calib, x)
""",
    fix="normalize the inputs to similar ranges before the op (e.g. a BN or a 1x1 conv on the "
        "small branch), output them separately, or use qint16 for this op where the march "
        "allows it",
    check=_check,
)
