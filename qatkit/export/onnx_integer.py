"""The ``integer`` ONNX flavour: the fixed-point model of ``docs/fixed-point.md`` as ONNX ops.

The graph is built from the data-flow trace of the converted model (``qatkit.trace``) and the
constants each fixed-point module caches for its input scale, so it computes the same integers:

* quantized activations are int32 tensors holding values of their qint8/qint16 range;
* conv/linear accumulate with ConvInteger/MatMulInteger (int8 x int8 -> int32); an int16 input
  is split exactly into ``2^14 a + 2^7 b + c`` (int8 parts of at most 7 bits of magnitude, see
  ``split16``) and accumulated three times;
  a transposed conv is a ConvInteger on the zero-inserted input with flipped weights;
* requantization ``floor((v * m + 2^(n-1)) / 2^n)`` runs in int64 with the exact floor division
  ``(t - Mod(t, 2^n)) / 2^n`` (``Mod`` with ``fmod=0`` takes the divisor's sign, so the
  remainder is in ``[0, 2^n)`` and the integer ``Div`` is exact);
* saturation and fused clamps are ``Clip``; lookup tables are ``Gather``; bilinear taps are
  ``Gather`` plus int64 ``Mul``/``Add``; average pooling is a ConvInteger with a ones kernel;
* max pooling runs in float32, which holds every int16 exactly (pooling never changes a value);
* QuantStub is ``Clip(Round(x / s))`` in float32 (ONNX ``Round`` is half to even, as torch's);
  DeQuantStub is ``float32(float64(q) * float64(s))``.

A module kind without an exact form here is refused (QK106) with its name, never approximated.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import qrange
from qatkit.fixed_point import kernels as fp
from qatkit.fixed_point.modules import (
    QAvgPool2d,
    QAvgPool2dDivisor,
    QClamp,
    QConv2d,
    QConvTranspose2d,
    QDeQuantStub,
    QFunctional,
    QLayerNorm,
    QLinear,
    QLookupTable,
    QPReLU,
    QQuantStub,
    QSoftmax,
    QUpsampleBilinear,
    _key,
)
from qatkit.quantization import trace as tr

OPSET = 17
RESHAPES = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous",
                      "view_as", "reshape_as", "unflatten"})
# ops that move values without changing them (the same ONNX form in both flavours); a split
# has several outputs, each consumer picks its part (``Node.picks``)
SPLITS = frozenset({"chunk", "split"})


def _refuse(node: tr.Node, why: str) -> Exception:
    return fail("QK106", f"integer ONNX export: {node.label!r} ({node.op}) {why}",
                "express it with an op the exporter supports (see docs/export.md), or move it "
                "outside the QuantStub ... DeQuantStub region")


class Builder:
    """A growing ONNX graph: nodes, initializers, fresh names."""

    def __init__(self) -> None:
        from onnx import helper
        self.helper = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        from onnx import numpy_helper
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        return self.ops(op_type, inputs, 1, hint, **attrs)[0]

    def ops(self, op_type: str, inputs: list[str], n: int, hint: str = "", **attrs: Any
            ) -> list[str]:
        """A node with ``n`` outputs."""
        outs = [self.name(hint or op_type.lower()) for _ in range(n)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, **attrs))
        return outs

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], "cast", to=to)


def _along(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


class IntegerExporter:
    """Walks a trace of the converted model and emits the integer graph."""

    FLAVOUR = "integer"

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        from onnx import TensorProto
        self.T = TensorProto
        self.model = model
        self.example = example_inputs if isinstance(example_inputs, tuple) else (
            example_inputs,)
        self.b = Builder()
        self.values: dict[int, str] = {}  # node index -> ONNX tensor name
        self.layers: dict[str, str] = {}  # node label -> int32 tensor name (quantized nodes)
        self.layer_shapes: dict[str, list[Any]] = {}
        self.layer_types: dict[str, int] = {}  # tensor name -> ONNX dtype (default int32)
        self.opset = OPSET

    # ---- integer building blocks ----------------------------------------------------------
    def i64(self, x: str) -> str:
        return self.b.cast(x, self.T.INT64)

    def requant(self, v: str, m: Any, n: Any, axis: int | None, ndim: int) -> str:
        """``floor((v * m + 2^(n-1)) / 2^n)`` (n >= 1) or ``v * m * 2^-n`` in int64, per tensor
        or per channel along ``axis`` (section 4)."""
        m = np.asarray(torch.as_tensor(m).tolist(), dtype=np.int64)
        n = np.asarray(torch.as_tensor(n).tolist(), dtype=np.int64)
        m, n = np.broadcast_arrays(m, n)
        return self.requant_shaped(v, _along(m, axis, ndim), _along(n, axis, ndim))

    def requant_shaped(self, v: str, m: np.ndarray, n: np.ndarray) -> str:
        """:meth:`requant` with int64 ``m``, ``n`` already shaped to broadcast against ``v``
        (e.g. one multiplier per output position)."""
        m, n = np.broadcast_arrays(np.asarray(m, np.int64), np.asarray(n, np.int64))
        big = n >= 63  # |v * m| < 2^62: the result is 0, as requant_mn's shift by 63 gives
        m, n = np.where(big, 0, m), np.where(big, 1, n)
        right, left = np.maximum(n, 0), np.maximum(-n, 0)
        b, T = self.b, np.int64
        t = b.op("Mul", [v, b.const(m * (2**left), T, "m")])
        if (right > 0).any():
            rnd = np.where(right > 0, 2 ** np.maximum(right - 1, 0), 0)
            t = b.op("Add", [t, b.const(rnd, T, "rnd")])
            t = self.floor_div(t, b.const(2**right, T, "pow2"))
        return t

    def requant_wide(self, acc: str, plan: dict[str, torch.Tensor], axis: int, nd: int) -> str:
        """``requant(acc + q_b, m, n)`` for a bias ``q_b`` beyond int32, from the module's own
        plan (``kernels.wide_plan``, docs/fixed-point.md section 5) in int64:
        ``((bump + floor((acc * m + A) / 2^right)) * 2^left) + H``. ``|acc * m|`` and ``|A|``
        are below 2^62, so the sum is an int64; a right shift of 63 (``2^63`` is no int64) is
        two exact floor divisions, by 2^62 and by 2 (``floor(floor(t / a) / b) = floor(t /
        (a b))``)."""
        b, T = self.b, np.int64
        p = {k: _along(v.cpu().numpy().astype(T), axis, nd) for k, v in plan.items()}
        t = b.op("Add", [b.op("Mul", [acc, b.const(p["m"], T, "m")]), b.const(p["A"], T, "A")])
        first = np.minimum(p["right"], 62)
        for d in (first, p["right"] - first):
            if (d > 0).any():
                t = self.floor_div(t, b.const(2**d, T, "pow2"))
        if (p["bump"] != 0).any():
            t = b.op("Add", [t, b.const(p["bump"], T, "bump")])
        if (p["left"] > 0).any():
            t = b.op("Mul", [t, b.const(2 ** p["left"], T, "pow2")])
        return b.op("Add", [t, b.const(p["H"], T, "H")], "wide")

    def floor_div(self, t: str, d: str) -> str:
        """``floor(t / d)`` for int64 ``t`` and positive ``d``: ``(t - Mod(t, d)) / d`` (the
        remainder of ``Mod`` with ``fmod=0`` is in ``[0, d)``, so the ``Div`` is exact)."""
        b = self.b
        return b.op("Div", [b.op("Sub", [t, b.op("Mod", [t, d], fmod=0)]), d], "floordiv")

    def clip32(self, v: str, lo: int, hi: int) -> str:
        c = self.b.op("Clip", [v, self.b.const(lo, np.int64, "lo"),
                               self.b.const(hi, np.int64, "hi")])
        return self.b.cast(c, self.T.INT32)

    def split16(self, x: str) -> list[tuple[str, int]]:
        """int16 values (int32 tensor) as ``2^14 a + 2^7 b + c``: ``c = x mod 2^7`` and ``b =
        floor(x / 2^7) mod 2^7`` in [0, 127], ``a = floor(x / 2^14)`` in [-2, 1], each an int8
        tensor, with its weight. Every part stays within 7 bits of magnitude because
        onnxruntime's AVX2 int8 kernels (no VNNI) add pairs of u8 x s8 products in int16 with
        saturation (``vpmaddubsw``): a uint8 part up to 255 gives wrong sums on those CPUs, a
        part of at most 127 against int8 weights cannot reach 2^15 (2 * 127 * 128 = 32512)."""
        b = self.b
        k = b.const(128, np.int32, "k128")
        parts, t = [], x
        for weight in (1, 128):
            r = b.op("Mod", [t, k], fmod=0)
            parts.append((b.cast(r, self.T.INT8), weight))
            t = b.op("Div", [b.op("Sub", [t, r]), k])
        parts.append((b.cast(t, self.T.INT8), 1 << 14))
        return parts

    def accumulate(self, x: str, dtype: str, fn: Any) -> str:
        """``fn(int8 input) -> int32``, exact for int8 and (split) int16 inputs; int64."""
        if dtype == "qint8":
            return self.i64(fn(self.b.cast(x, self.T.INT8)))
        b, total = self.b, None
        for part, weight in self.split16(x):
            acc = self.i64(fn(part))
            if weight != 1:
                acc = b.op("Mul", [acc, b.const(weight, np.int64, f"k{weight}")])
            total = acc if total is None else b.op("Add", [total, acc])
        assert total is not None
        return total

    # ---- modules -----------------------------------------------------------------------
    def conv(self, mod: QConv2d, x: QTensor, name: str, node: tr.Node) -> tuple[str, Any]:
        c = mod._prep(x)
        w = self.b.const(mod.weight.numpy(), np.int8, "w")
        attrs = {"strides": list(mod.stride), "dilations": list(mod.dilation),
                 "group": mod.groups, "pads": [mod.padding[0], mod.padding[1]] * 2}
        acc = self.accumulate(name, x.dtype,
                              lambda t: self.b.op("ConvInteger", [t, w], "conv", **attrs))
        return self._weighted_out(mod, c, acc, 1, 4)

    def conv_transpose(self, mod: QConvTranspose2d, x: QTensor, name: str) -> tuple[str, Any]:
        """The transposed conv as a ConvInteger (integers only, exact): the input with
        ``stride - 1`` zeros inserted between its elements, padded by ``d * (k - 1) - p`` before
        and that plus ``output_padding`` after (a negative amount crops), convolved with stride
        1 by the weights flipped in both spatial axes, in the output-channel-first layout."""
        c = mod._prep(x)
        b, T = self.b, np.int64
        h, w = x.q.shape[-2:]
        (sh, sw), (dh, dw) = mod.stride, mod.dilation
        kh, kw = mod.weight.shape[-2:]
        t = name
        if (sh, sw) != (1, 1):  # zero insertion: [N,C,H,1,W,1] padded to [N,C,H,sh,W,sw]
            ch = x.q.shape[1]
            t = self.reshape(t, (0, ch, h, 1, w, 1))
            t = b.op("Pad", [t, b.const([0, 0, 0, 0, 0, 0, 0, 0, 0, sh - 1, 0, sw - 1], T,
                                        "pads")])
            t = self.reshape(t, (0, ch, h * sh, w * sw))
        # pads relative to the zero-inserted tensor, whose last sh-1 rows (sw-1 cols) are extra
        before = [dh * (kh - 1) - mod.padding[0], dw * (kw - 1) - mod.padding[1]]
        after = [before[0] + mod.output_padding[0] - (sh - 1),
                 before[1] + mod.output_padding[1] - (sw - 1)]
        if min(before + after) < 0:
            starts = [max(-v, 0) for v in before]
            ends = [h * sh - max(-after[0], 0), w * sw - max(-after[1], 0)]
            t = b.op("Slice", [t, b.const(starts, T, "starts"), b.const(ends, T, "ends"),
                               b.const([2, 3], T, "axes")])
        pads = [max(v, 0) for v in before] + [max(v, 0) for v in after]
        wf = b.const(mod.weight.flip(2, 3).numpy(), np.int8, "w")
        attrs = {"strides": [1, 1], "dilations": [dh, dw], "group": mod.groups, "pads": pads}
        acc = self.accumulate(t, x.dtype,
                              lambda v: self.b.op("ConvInteger", [v, wf], "convT", **attrs))
        return self._weighted_out(mod, c, acc, 1, 4)

    def linear(self, mod: QLinear, x: QTensor, name: str) -> tuple[str, Any]:
        c = mod._prep(x)
        wt = self.b.const(mod.weight.t().contiguous().numpy(), np.int8, "wt")
        acc = self.accumulate(name, x.dtype,
                              lambda t: self.b.op("MatMulInteger", [t, wt], "matmul"))
        nd = x.q.dim()
        return self._weighted_out(mod, c, acc, nd - 1, nd)

    def _weighted_out(self, mod: Any, c: dict, acc: str, axis: int, nd: int) -> tuple[str, Any]:
        b = self.b
        if c["wide"] is not None:  # a bias beyond int32 (section 5): added in the requant
            q = self.requant_wide(acc, c["wide"], axis, nd)
            if mod.output_mode == "quantized":
                return self.clip32(q, *c["clamp"]), None
            return self.clip32(q, *qrange("qint32")), axis
        acc = b.op("Add", [acc, b.const(_along(c["q_b"].numpy(), axis, nd), np.int64, "bias")])
        if mod.output_mode == "quantized":
            m, n = c["mn"]
            return self.clip32(self.requant(acc, m, n, axis, nd), *c["clamp"]), None
        return self.clip32(acc, *qrange("qint32")), axis

    def quant(self, mod: QQuantStub, name: str) -> str:
        b, s = self.b, float(mod.out_scale)
        lo, hi = qrange(mod.out_dtype)
        r = b.op("Round", [b.op("Div", [name, b.const(s, np.float32, "s")])])
        r = b.op("Clip", [r, b.const(lo, np.float32, "lo"), b.const(hi, np.float32, "hi")])
        return b.cast(r, self.T.INT32)

    def dequant(self, x: QTensor, name: str) -> str:
        b = self.b
        s = _along(x.scale.to(torch.float64).numpy(), x.axis, x.q.dim())
        d = b.op("Mul", [b.cast(name, self.T.DOUBLE), b.const(s, np.float64, "s")])
        return b.cast(d, self.T.FLOAT)

    def window_sum(self, x: QTensor, name: str, kernel: Any, stride: Any, padding: Any,
                   after: tuple[int, int] | None = None) -> str:
        """Exact window sums (zero padding) by a depthwise ConvInteger with a ones kernel;
        ``after``: other bottom/right padding (ceil-mode windows), else ``padding``."""
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        sh, sw = (stride, stride) if isinstance(stride, int) else (stride or (kh, kw))
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        ch = x.q.shape[1]
        ones = self.b.const(np.ones((ch, 1, kh, kw)), np.int8, "ones")
        attrs = {"strides": [sh, sw], "group": ch, "pads": [ph, pw, *(after or (ph, pw))]}
        return self.accumulate(name, x.dtype,
                               lambda t: self.b.op("ConvInteger", [t, ones], "sum", **attrs))

    def bilinear(self, mod: QUpsampleBilinear, x: QTensor, name: str) -> str:
        b, T = self.b, np.int64
        (y0, y1, wy), (x0, x1, wx), (m, n) = mod.params(x)
        nd = x.q.dim()
        q = self.i64(name)

        def tap(t: str, idx: torch.Tensor, axis: int) -> str:
            return b.op("Gather", [t, b.const(idx.numpy(), T, "idx")], axis=axis)

        wy_c = (wy.numpy()[:, None]).astype(np.int64)
        rows = b.op("Add", [b.op("Mul", [tap(q, y0, nd - 2), b.const(256 - wy_c, T, "w0")]),
                            b.op("Mul", [tap(q, y1, nd - 2), b.const(wy_c, T, "w1")])])
        wx_c = wx.numpy().astype(np.int64)
        acc = b.op("Add", [b.op("Mul", [tap(rows, x0, nd - 1), b.const(256 - wx_c, T, "w0")]),
                           b.op("Mul", [tap(rows, x1, nd - 1), b.const(wx_c, T, "w1")])])
        lo, hi = qrange(mod.out_dtype)
        return self.clip32(self.requant(acc, m, n, None, nd), lo, hi)

    def nearest(self, x: QTensor, name: str, **kwargs: Any) -> str:
        """Nearest resize as Gathers whose indices are torch's own (interpolate on an index
        grid), so the source rule is PyTorch's by construction."""
        h, w = x.q.shape[-2:]
        nd = x.q.dim()
        grid = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
        src = F.interpolate(grid, mode="nearest", **kwargs)[0, 0].to(torch.int64)
        rows, cols = (src[:, 0] // w).numpy(), (src[0, :] % w).numpy()
        b = self.b
        t = b.op("Gather", [name, b.const(rows, np.int64, "idx")], axis=nd - 2)
        return b.op("Gather", [t, b.const(cols, np.int64, "idx")], axis=nd - 1)

    def maxpool(self, name: str, kernel: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: bool) -> str:
        def pair(v: Any) -> list[int]:
            return [v, v] if isinstance(v, int) else list(v)

        kernel = pair(kernel)
        stride = pair(stride) if stride not in (None, []) else kernel
        ph, pw = pair(padding)
        f = self.b.op("MaxPool", [self.b.cast(name, self.T.FLOAT)], "maxpool",
                      kernel_shape=kernel, strides=stride, pads=[ph, pw, ph, pw],
                      dilations=pair(dilation), ceil_mode=int(bool(ceil_mode)))
        return self.b.cast(f, self.T.INT32)

    # ---- sections 14 to 17 --------------------------------------------------------------
    def reduce(self, op: str, v: str, axes: list[int], keepdims: int = 1) -> str:
        """``ReduceSum``/``ReduceMax`` over ``axes`` (an input from opset 18, ReduceSum 13)."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.b.op(op, [v, self.b.const(axes, np.int64, "axes")], keepdims=keepdims)
        return self.b.op(op, [v], axes=axes, keepdims=keepdims)

    def prelu(self, mod: QPReLU, x: QTensor, name: str, node: tr.Node) -> str:
        """``requant(q, M_pos)`` where ``q >= 0``, else ``requant(q, M_neg[c])`` (section 14),
        the two requants side by side and a ``Where``."""
        M_pos, M_neg = _cached(mod, _key(x), node)
        nd, b = x.q.dim(), self.b
        axis = 1 if mod.slope.numel() > 1 else None
        v = self.i64(name)
        pos = self.requant(v, *fp.multiplier(M_pos), None, nd)
        neg = self.requant(v, *fp.multiplier(M_neg if axis else M_neg.reshape(())), axis, nd)
        sel = b.op("Where", [b.op("GreaterOrEqual", [v, b.const(0, np.int64, "zero")]), pos,
                             neg], "prelu")
        return self.clip32(sel, *qrange(mod.out_dtype))

    def softmax(self, mod: QSoftmax, x: QTensor, name: str, node: tr.Node) -> str:
        """Section 15 in int64: ``e = Gather(t, max - q)``, ``S = ReduceSum(e)``, ``r = (e *
        2^31 + S) / (2 * S)`` (both positive: the truncating ``Div`` is the floor), then the
        requant by ``M = 2^-30 / s_o``."""
        table, M = _cached(mod, _key(x), node)
        nd, b, T = x.q.dim(), self.b, np.int64
        axes = [mod.dim % nd]
        v = self.i64(name)
        d = b.op("Sub", [self.reduce("ReduceMax", v, axes), v])
        e = b.op("Gather", [b.const(table.numpy(), T, "exp"), d], "exp", axis=0)
        total = self.reduce("ReduceSum", e, axes)
        num = b.op("Add", [b.op("Mul", [e, b.const(2**(fp.SOFTMAX_FRAC + 1), T)]), total])
        r = b.op("Div", [num, b.op("Mul", [total, b.const(2, T)])], "ratio")
        return self.clip32(self.requant(r, *fp.multiplier(M), None, nd), *qrange(mod.out_dtype))

    def layer_norm(self, mod: QLayerNorm, x: QTensor, name: str, node: tr.Node) -> str:
        """Section 16 in int64, as ``kernels.layer_norm_normalize`` computes it: the sums, ``D``
        and ``c``; the bit length of ``D`` as the count of powers of two it reaches; shifts as
        multiplications/divisions by powers of two ``Gather``ed from a table (``D >= 0``: the
        truncating ``Div`` is the floor); ``isqrt`` as the float64 square root corrected by one
        step each way (exact whatever the last bit of ``Sqrt``); then the affine requants."""
        nd, b, T = x.q.dim(), self.b, np.int64
        dims = mod._dims(nd)
        E, M_w, b_i, G = _cached(mod, (*_key(x), nd), node)
        n = 1
        for dim in dims:
            n *= x.q.shape[dim]
        axes = list(dims)

        def k(v: int) -> str:
            return b.const(v, T, "k")

        def as_i64(t: str) -> str:
            return b.cast(t, self.T.INT64)

        q = self.i64(name)
        s1 = self.reduce("ReduceSum", q, axes)
        s2 = self.reduce("ReduceSum", b.op("Mul", [q, q]), axes)
        var = b.op("Sub", [b.op("Mul", [s2, k(n)]), b.op("Mul", [s1, s1])])
        D = b.op("Add", [b.op("Mul", [var, k(2**G)]), k(E)], "D")
        c = b.op("Sub", [b.op("Mul", [q, k(n)]), s1])
        pow2 = b.const(2 ** np.arange(63, dtype=T), T, "pow2")
        reached = b.op("GreaterOrEqual", [b.op("Unsqueeze", [D, b.const([nd], T, "axes")]),
                                          pow2])
        bits = self.reduce("ReduceSum", as_i64(reached), [nd], keepdims=0)
        kk = self.floor_div(b.op("Sub", [bits, k(31)]), k(2))  # D / 4^kk in [2^30, 2^32)
        two_k = b.op("Mul", [kk, k(2)])
        right = b.op("Max", [two_k, k(0)])
        left = b.op("Max", [b.op("Neg", [two_k]), k(0)])
        Dn = b.op("Mul", [b.op("Div", [D, b.op("Gather", [pow2, right], axis=0)]),
                          b.op("Gather", [pow2, left], axis=0)], "Dn")
        v = b.op("Mul", [Dn, k(2**16)])  # < 2^48: exact in float64
        r = as_i64(b.op("Floor", [b.op("Sqrt", [b.cast(v, self.T.DOUBLE)])]))
        r = b.op("Sub", [r, as_i64(b.op("Greater", [b.op("Mul", [r, r]), v]))])
        r1 = b.op("Add", [r, k(1)])
        sq = b.op("Add", [r, as_i64(b.op("LessOrEqual", [b.op("Mul", [r1, r1]), v]))], "isqrt")
        shift = b.op("Sub", [k(32 + G // 2), kk])  # 16 + G/2 .. 48 + G/2
        num = b.op("Mul", [c, b.op("Gather", [pow2, shift], axis=0)])
        live = b.op("Greater", [D, k(0)])
        sq = b.op("Where", [live, sq, k(1)])
        y = self.floor_div(b.op("Add", [b.op("Mul", [num, k(2)]), sq]), b.op("Mul", [sq, k(2)]))
        y = b.op("Where", [live, y, k(0)], "norm")
        m, nw = fp.multiplier(M_w)
        t = b.op("Add", [self.requant_shaped(y, m.numpy(), nw.numpy()),
                         b.const(b_i.numpy(), T, "b")])
        return self.clip32(self.requant(t, 1, 8, None, nd), *qrange(mod.out_dtype))

    def avg_pool_divisor(self, mod: QAvgPool2dDivisor, x: QTensor, name: str, node: tr.Node
                         ) -> str:
        """Section 17: the window sums, ceil-mode windows by more zero padding after (zeros
        add nothing; ``max(0, (out - 1) * s + k - size - p)`` makes exactly PyTorch's output
        count), then one requant per output position."""
        if x.q.dim() != 4:
            raise _refuse(node, "needs an NCHW input.")
        h, w = x.q.shape[-2:]
        m, n = _cached(mod, (*_key(x), h, w), node)
        after = tuple(max(0, (fp.pool_out_size(size, k, s, p, mod.ceil_mode) - 1) * s + k
                          - size - p)
                      for size, k, s, p in zip((h, w), mod.kernel, mod.stride, mod.padding))
        acc = self.window_sum(x, name, mod.kernel, mod.stride, mod.padding, after)
        q = self.requant_shaped(acc, m.numpy(), n.numpy())
        return self.clip32(q, *qrange(mod.out_dtype))

    def relu(self, name: str) -> str:
        return self.b.op("Max", [name, self.b.const(0, np.int32, "zero")], "relu")

    def reshape(self, name: str, shape: tuple[int, ...]) -> str:
        return self.b.op("Reshape", [name, self.b.const(list(shape), np.int64, "shape")])

    def functional(self, mod: QFunctional, node: tr.Node, xs: list[QTensor], names: list[str]
                   ) -> str:
        b, op, args = self.b, node.op, node.arguments or {}
        lo, hi = qrange(mod.out_dtype)
        out_nd = len(node.shape or ())
        if op in ("add", "add_relu", "sub", "add_scalar"):
            a = xs[0]
            other = xs[1] if len(xs) > 1 else None
            pa, pb = mod.add_plans(a, other, args.get("c"))
            total = self.requant(self.i64(names[0]), pa[1], pa[2], a.axis, a.q.dim())
            if other is not None:
                bi = self.requant(self.i64(names[1]), pb[1], pb[2], other.axis, other.q.dim())
                total = b.op("Sub" if op == "sub" else "Add", [total, bi])
            else:
                total = b.op("Add", [total, b.const(pb, np.int64, "c")])
            q = self.requant(total, 1 << 14, 22, None, out_nd)  # exactly 2^-8 (section 6)
        elif op in ("mul", "matmul"):
            x0, x1 = (self.i64(nm) for nm in names)
            prod = b.op("Mul" if op == "mul" else "MatMul", [x0, x1])
            q = self.requant(prod, *mod.prod_mn(xs[0], xs[1]), None, out_nd)
        elif op == "mul_scalar":
            q = self.requant(self.i64(names[0]), *mod.mul_scalar_mn(xs[0], args["c"]), None,
                             out_nd)
        elif op in ("sum", "mean"):
            dims = args["dim"] if isinstance(args["dim"], (tuple, list)) else [args["dim"]]
            acc = b.op("ReduceSum", [self.i64(names[0]), b.const(list(dims), np.int64, "axes")],
                       keepdims=int(bool(args.get("keepdim", False))))
            mn = mod.rq_mn(xs[0]) if op == "sum" else mod.mean_mn(
                xs[0], xs[0].q.numel() // max(node.output.q.numel(), 1))
            q = self.requant(acc, *mn, None, out_nd)
        elif op in ("maximum", "minimum", "cat", "concat", "stack"):
            same = [self.clip32(self.requant(self.i64(nm), *mod.rq_mn(x), None, x.q.dim()),
                                lo, hi) for x, nm in zip(xs, names)]
            if op in ("maximum", "minimum"):
                return self._relu_if(mod, op, b.op("Max" if op == "maximum" else "Min", same))
            dim = args.get("dim", 0)
            if op == "stack":
                dim = dim % out_nd
                same = [b.op("Unsqueeze", [s, b.const([dim], np.int64, "axes")]) for s in same]
            else:
                dim = dim % out_nd
            return self._relu_if(mod, op, b.op("Concat", same, axis=dim))
        else:
            raise _refuse(node, "has no integer ONNX form yet.")
        return self._relu_if(mod, op, self.clip32(q, lo, hi))

    def _relu_if(self, mod: QFunctional, op: str, name: str) -> str:
        return self.relu(name) if mod.relu_after(op) else name

    # ---- the walk ------------------------------------------------------------------------
    def build(self) -> Any:
        from onnx import helper
        g, flat = self.traced()
        self.prepare(g)
        by_obj = {id(n.output): n for n in g.nodes if n.output is not None}
        needed = _needed(g, [by_obj[id(o)] for o in flat if id(o) in by_obj])
        graph_inputs = []
        for node in g.nodes:
            if node.kind != "input" and node.index not in needed:
                continue  # e.g. constants computed on a first call: not part of the data flow
            if node.kind == "input":
                t = node.output
                if isinstance(t, QTensor) or not t.is_floating_point():
                    raise _refuse(node, "is not a float tensor; the exported model takes the "
                                  "float inputs of its QuantStubs.")
                name = f"input_{len(graph_inputs)}"
                dims = ["N", *t.shape[1:]] if t.dim() else []
                graph_inputs.append(helper.make_tensor_value_info(name, self.T.FLOAT, dims))
                self.values[node.index] = name
            else:
                self.values[node.index] = self.emit(node, g)
        graph_outputs = []
        for i, o in enumerate(flat):
            n = by_obj.get(id(o))
            if n is None or isinstance(o, QTensor):
                raise fail("QK106", f"integer ONNX export: model output {i} is not a float "
                           "tensor returned by a DeQuantStub.",
                           "end every output with a DeQuantStub")
            name = f"output_{i}"
            self.b.nodes.append(helper.make_node("Identity", [self.values[n.index]], [name]))
            graph_outputs.append(helper.make_tensor_value_info(name, self.T.FLOAT,
                                                               ["N", *o.shape[1:]]))
        for name in self.layers.values():
            graph_outputs.append(helper.make_tensor_value_info(
                name, self.layer_types.get(name, self.T.INT32), self.layer_shapes[name]))
        graph = helper.make_graph(self.b.nodes, f"qatkit_{self.FLAVOUR}", graph_inputs,
                                  graph_outputs, self.b.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="qatkit")
        model.ir_version = 8 if self.opset <= 17 else 10
        helper.set_model_props(model, {"qatkit.flavour": self.FLAVOUR,
                                       "qatkit.layers": ",".join(
                                           f"{k}={v}" for k, v in self.layers.items()),
                                       **self.extra_props()})
        return model

    def prepare(self, g: tr.Graph) -> None:
        """Called with the trace before the walk (the qdq flavour picks its opset here)."""

    def extra_props(self) -> dict[str, str]:
        """More model properties (the qdq flavour adds its encodings)."""
        return {}

    def traced(self) -> tuple[tr.Graph, list[Any]]:
        """The trace of one forward on the example inputs, and the model's flat outputs."""
        outputs: list[Any] = []
        hook = self.model.register_forward_hook(lambda m, a, out: outputs.append(out))
        try:
            with torch.no_grad():
                g = tr.trace(self.model, self.example)
        finally:
            hook.remove()
        flat: list[Any] = []
        tr._walk(outputs[-1], flat.append)
        return g, flat

    def operands(self, node: tr.Node, g: tr.Graph) -> tuple[list[Any], list[str]]:
        """The traced inputs of ``node`` and their ONNX names; of a producer with several
        outputs (chunk), the part the node took."""
        xs: list[Any] = []
        names: list[str] = []
        for i, pick in zip(node.inputs, node.picks or [0] * len(node.inputs), strict=True):
            if i < 0:
                continue
            x, name = g.nodes[i].output, self.values[i]
            if isinstance(name, list):
                parts: list[Any] = []
                tr._walk(x, parts.append)
                x, name = parts[pick], name[pick]
            xs.append(x)
            names.append(name)
        return xs, names

    def split(self, node: tr.Node, x: Any, name: str) -> list[str]:
        """chunk/split as one ONNX ``Split`` with the traced parts' sizes (values unchanged)."""
        args, kwargs = node.arguments or ((), {})
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % len(x.shape)
        parts: list[Any] = []
        tr._walk(node.output, parts.append)
        sizes = [int(p.shape[dim]) for p in parts]
        return self.b.ops("Split", [name, self.b.const(sizes, np.int64, "sizes")], len(parts),
                          "split", axis=dim)

    def emit(self, node: tr.Node, g: tr.Graph) -> Any:
        xs, names = self.operands(node, g)
        mod, out = node.module, node.output
        if node.kind == "functional":
            if not isinstance(mod, QFunctional):
                raise _refuse(node, "is a FloatFunctional of a model that was not converted.")
            res = self.functional(mod, node, xs, names)
        elif node.kind == "module":
            res = self.module(node, mod, xs, names)
        else:
            res = self.function(node, xs, names)
        if isinstance(out, QTensor) and node.kind != "input":
            self.layers[layer_key(node)] = res
            self.layer_shapes[res] = ["N", *out.q.shape[1:]] if out.q.dim() else []
        return res

    def module(self, node: tr.Node, mod: nn.Module, xs: list[Any], names: list[str]) -> str:
        if isinstance(mod, QQuantStub):
            return self.quant(mod, names[0])
        x, name = (xs[0], names[0]) if xs else (None, "")
        if isinstance(mod, QDeQuantStub):
            return self.dequant(x, name) if isinstance(x, QTensor) else self._same(name)
        if not isinstance(x, QTensor):
            raise _refuse(node, "runs on float values; only the quantized region between "
                          "QuantStub and DeQuantStub is exported.")
        if x.axis is not None and not isinstance(mod, (nn.ReLU, nn.Identity, nn.Dropout)):
            raise _refuse(node, "receives a per-channel (high-precision) tensor.")
        if isinstance(mod, QConv2d):
            return self.conv(mod, x, name, node)[0]
        if isinstance(mod, QLinear):
            return self.linear(mod, x, name)[0]
        if isinstance(mod, QConvTranspose2d):
            return self.conv_transpose(mod, x, name)[0]
        if isinstance(mod, QLookupTable):
            table = self.b.const(mod.table(x).to(torch.int32).numpy(), np.int32, "table")
            idx = self.b.op("Sub", [self.i64(name), self.b.const(qrange(x.dtype)[0], np.int64)])
            return self.b.op("Gather", [table, idx], "lut", axis=0)
        if isinstance(mod, QClamp):
            lo, hi, m, n = mod.params(x)
            c = self.b.op("Clip", [self.i64(name), self.b.const(lo, np.int64),
                                   self.b.const(hi, np.int64)])
            return self.clip32(self.requant(c, m, n, None, x.q.dim()), *qrange(mod.out_dtype))
        if isinstance(mod, QAvgPool2d):
            kernel, stride, padding, m, n = mod.params(x)
            acc = self.window_sum(x, name, kernel, stride, padding)
            return self.clip32(self.requant(acc, m, n, None, x.q.dim()), *qrange(mod.out_dtype))
        if isinstance(mod, QUpsampleBilinear):
            return self.bilinear(mod, x, name)
        if isinstance(mod, QPReLU):
            return self.prelu(mod, x, name, node)
        if isinstance(mod, QSoftmax):
            return self.softmax(mod, x, name, node)
        if isinstance(mod, QLayerNorm):
            return self.layer_norm(mod, x, name, node)
        if isinstance(mod, QAvgPool2dDivisor):
            return self.avg_pool_divisor(mod, x, name, node)
        if isinstance(mod, nn.ReLU):
            return self.relu(name)
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return self._same(name)
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise _refuse(node, "returns indices.")
            return self.maxpool(name, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                mod.ceil_mode)
        if isinstance(mod, nn.Flatten):
            return self.reshape(name, self._shape(node, x))
        if isinstance(mod, nn.Upsample) and mod.mode == "nearest":
            return self.nearest(x, name, size=mod.size, scale_factor=mod.scale_factor,
                                recompute_scale_factor=mod.recompute_scale_factor)
        raise _refuse(node, "has no integer ONNX form yet.")

    def function(self, node: tr.Node, xs: list[Any], names: list[str]) -> str:
        op = node.op
        x, name = xs[0], names[0]
        args, kwargs = node.arguments or ((), {})
        if isinstance(x, QTensor) and x.axis is not None:
            raise _refuse(node, "is applied to a per-channel (high-precision) tensor.")
        if op in RESHAPES:
            return self.reshape(name, self._shape(node, x))
        if op in ("permute", "transpose", "t"):
            nd = len(x.shape)
            if op == "permute":
                dims = args[1:] if len(args) > 2 else args[1]
                perm = [d % nd for d in dims]
            else:
                d0, d1 = (args[1], args[2]) if op == "transpose" else (0, 1)
                perm = list(range(nd))
                perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
            return self.b.op("Transpose", [name], perm=perm)
        if op in SPLITS:
            return self.split(node, x, name)  # type: ignore[return-value]
        if not isinstance(x, QTensor):
            raise _refuse(node, "runs on float values; only the quantized region between "
                          "QuantStub and DeQuantStub is exported.")
        if op in ("relu", "relu_"):
            return self.relu(name)
        if op == "dropout":
            return self._same(name)
        if op in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
            a = inspect.signature(F.max_pool2d).bind(*args, **kwargs).arguments
            if a.get("return_indices"):
                raise _refuse(node, "returns indices.")
            return self.maxpool(name, a["kernel_size"], a.get("stride"), a.get("padding", 0),
                                a.get("dilation", 1), a.get("ceil_mode", False))
        if op == "interpolate":
            a = inspect.signature(F.interpolate).bind(*args, **kwargs).arguments
            a.pop("input")
            if a.pop("mode", "nearest") != "nearest":
                raise _refuse(node, "is a non-nearest interpolate.")
            a.pop("align_corners", None)
            a.pop("antialias", None)
            return self.nearest(x, name, **a)
        raise _refuse(node, "has no integer ONNX form yet.")

    def _same(self, name: str) -> str:
        return self.b.op("Identity", [name])

    @staticmethod
    def _shape(node: tr.Node, x: Any) -> tuple[int, ...]:
        shape = tuple(node.shape or ())
        # keep the batch size free when the op keeps the leading axis
        return (0, *shape[1:]) if shape and x.shape and shape[0] == x.shape[0] else shape


def layer_key(node: tr.Node) -> str:
    """A layer's name in ``qatkit.layers``: the module's label; a torch call (``reshape``,
    which a model makes many of) with its place in the trace."""
    return f"{node.op}@{node.index}" if node.kind == "function" else node.label


def _cached(mod: nn.Module, key: Any, node: tr.Node) -> Any:
    """The constants ``mod`` computed for its input scale in the traced forward: exactly the
    numbers the fixed-point model used."""
    c = mod._cache.get(key)
    if c is None:
        raise _refuse(node, "has no constants for its input (it did not run in the trace).")
    return c


def _needed(g: tr.Graph, outs: list[tr.Node]) -> set[int]:
    """The nodes the outputs depend on."""
    seen: set[int] = set()
    todo = [n.index for n in outs]
    while todo:
        i = todo.pop()
        if i in seen or i < 0:
            continue
        seen.add(i)
        if any(j < 0 for j in g.nodes[i].inputs) and g.nodes[i].kind != "input":
            raise fail("QK106", f"ONNX export: {g.nodes[i].label!r} takes a value the trace "
                       "did not see produced: indexing of a quantized tensor (x[:, :2]) or a "
                       "tensor made inside forward, which the exporter cannot express.",
                       "index after the DeQuantStub, or compute the tensor outside the model")
        todo.extend(g.nodes[i].inputs)
    return seen


def export_integer(model: nn.Module, example_inputs: Any) -> Any:
    """The integer ONNX ModelProto of a converted model (see the module docstring)."""
    return IntegerExporter(model, example_inputs).build()
