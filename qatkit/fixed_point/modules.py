"""Fixed-point forms of the operators: integer tensors (QTensor) in, integer tensors out.

Each module holds what ``docs/fixed-point.md`` needs (int8 weights, per-channel weight scales,
the float bias to be quantized at the input scale, the output scale and dtype) and computes with
``qatkit.fixed_point.kernels``. Quantities that depend on the input scale (int32 bias, multipliers,
lookup tables) are computed on the first call with a given input scale and cached.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from qatkit.base import recorder
from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import TORCH_DTYPE, qrange, quantize
from qatkit.fixed_point import kernels as fp


def _need_q(x: Any, who: nn.Module, per_tensor: bool = True) -> QTensor:
    if not isinstance(x, QTensor):
        raise fail("QK102", f"{type(who).__name__} received a float tensor in the fixed-point "
                   "model: a value reached a quantized op without passing a QuantStub.",
                   "put a QuantStub on every path by which data enters the quantized region")
    if per_tensor and x.axis is not None:
        raise fail("QK003", f"{type(who).__name__} received a high-precision (int32, "
                   "per-channel) output; such outputs may only feed DeQuantStubs.",
                   "give the producing conv/linear a quantized output, or dequantize first")
    return x


def _key(x: QTensor) -> tuple[float, str]:
    return (float(x.scale), x.dtype)


class QModule(nn.Module):
    _qatkit_leaf = True

    def __init__(self, out_scale: torch.Tensor | None, out_dtype: str) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("out_scale", None if out_scale is None
                             else out_scale.detach().clone().to(torch.float32))
        self._cache: dict[Any, Any] = {}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _out(self, q: torch.Tensor) -> QTensor:
        return QTensor(fp.saturate(q, self.out_dtype), self.out_scale, self.out_dtype)


class QQuantStub(QModule):
    """float -> QTensor: ``sat(round_half_even(x / s))`` (spec section 3)."""

    def forward(self, x: torch.Tensor) -> QTensor:
        if isinstance(x, QTensor):
            raise fail("QK000", "QuantStub received an already quantized tensor.",
                       "remove the second QuantStub on this path")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise fail("QK000", "the fixed-point model's QuantStub needs a float tensor, got "
                       + (f"a {str(x.dtype).removeprefix('torch.')} tensor" if isinstance(
                           x, torch.Tensor) else type(x).__name__) + ".",
                       "pass x.float() (uint8 images: x.float() / 255, then the normalisation)")
        q = quantize(x, self.out_scale, self.out_dtype)
        return QTensor(q.to(TORCH_DTYPE[self.out_dtype]), self.out_scale, self.out_dtype)


class QDeQuantStub(nn.Module):
    """QTensor -> float32 (``q * s`` in float64, rounded once)."""

    _qatkit_leaf = True

    def forward(self, x: Any) -> torch.Tensor:
        # convert leaves the model in eval(); train() mode with gradients means training
        if self.training and torch.is_grad_enabled():
            raise fail("QK000", "the fixed-point model is being trained (train() mode with "
                       "gradients): its weights are integers and it has no gradients.",
                       "train the QAT model (before qk.convert) and convert it again; call "
                       "model.eval() to run the fixed-point model")
        return x.dequantize() if isinstance(x, QTensor) else x


def _clamp_bounds(act: str | None, s_o: float, dtype: str, lo: float = 0.0, hi: float = 6.0
                  ) -> tuple[int, int] | None:
    qmin, qmax = qrange(dtype)
    if act is None:
        return None
    if act == "relu":
        return 0, qmax
    return (max(qmin, min(qmax, round(lo / s_o))), max(qmin, min(qmax, round(hi / s_o))))


class _QWeighted(QModule):
    """Shared by conv, linear and transposed conv (spec section 5)."""

    def __init__(self, qat: nn.Module, w_oc_first: torch.Tensor, activation: str | None
                 ) -> None:
        """``qat``: the QAT module; ``w_oc_first``: its weight with output channels first."""
        app = qat.activation_post_process
        super().__init__(None if app is None else app.scale,
                         "qint32" if app is None else app.dtype)
        bias = qat.bias
        s_w = qat.weight_fake_quant.weight_scale(w_oc_first, bias)  # zero channels: section 5
        self.qualified_name = ""  # convert names it, for errors about this module
        self.output_mode, self.activation = qat.output_mode, activation
        self.register_buffer("weight_scale", s_w.detach().clone().to(torch.float32))
        self.register_buffer("weight", fp.quantize_weight(w_oc_first.detach(), s_w))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def _prep(self, x: QTensor) -> dict[str, Any]:
        key = _key(x)
        c = self._cache.get(key)
        if c is None:
            s_in = x.scale.detach().to(torch.float32)
            n_out = self.weight.shape[0]
            b = self.bias if self.bias is not None else torch.zeros(n_out)
            c = {"q_b": fp.quantize_bias(b, s_in, self.weight_scale, self._who()),
                 "method": self._method(x.dtype)}
            if self.output_mode == "quantized":
                c["mn"] = fp.multiplier(fp.real_multiplier(s_in, self.weight_scale,
                                                           divide_by=self.out_scale))
                c["clamp"] = _clamp_bounds(self.activation, float(self.out_scale),
                                           self.out_dtype) or qrange(self.out_dtype)
                # the same integers through float64 where provably exact (spec section 12)
                c["f64"] = fp.requant_plan(*c["mn"], c["q_b"],
                                           fp.acc_bound(self.weight, x.dtype))
            else:
                c["acc_scale"] = fp.accumulator_scale(s_in, self.weight_scale)
                # int32 output: checked on every call unless a static bound proves it fits
                c["check"] = fp.acc_bound(self.weight, x.dtype) + int(
                    c["q_b"].abs().max()) >= fp.INT32_EXACT
            self._cache[key] = c
        return c

    def _method(self, in_dtype: str) -> str:
        return fp.conv_method(self.weight, in_dtype, getattr(self, "groups", 1))

    def _who(self) -> str:
        name = getattr(self, "qualified_name", "")
        return f"{type(self).__name__} {name!r}" if name else type(self).__name__

    def _finish(self, acc: torch.Tensor, c: dict[str, Any], axis: int) -> QTensor:
        if self.output_mode == "quantized" and c["f64"] is not None:
            q = fp.requant_f64(acc, c["f64"], *c["clamp"], self.out_dtype, axis)
            return QTensor(q, self.out_scale, self.out_dtype)
        acc = acc.to(torch.int64) + fp.along(c["q_b"], axis, acc.dim())
        if self.output_mode != "quantized":
            if c["check"]:
                fp.check_int32(acc, self._who())
            q = acc.to(torch.int32)
            return QTensor(q, c["acc_scale"], "qint32", axis=axis)
        q = fp.requant_mn(acc, *c["mn"], axis=axis).clamp(*c["clamp"])
        return self._out(q)


class QConv2d(_QWeighted):
    def __init__(self, qat: nn.Module) -> None:
        super().__init__(qat, qat.weight, qat.activation)
        self.stride, self.padding, self.dilation = qat.stride, qat.padding, qat.dilation
        self.groups = qat.groups
        if isinstance(self.padding, str) or qat.padding_mode != "zeros":
            raise fail("QK106", "fixed-point Conv2d needs numeric padding with zeros.",
                       "use padding=(ph, pw) and padding_mode='zeros'")

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        c = self._prep(x)
        if "w" not in c:
            c["w"] = fp.prepared_weight(self.weight, c["method"])
        acc = fp.conv2d(x.q, self.weight, self.stride, self.padding, self.dilation, self.groups,
                        c["method"], c["w"])
        return self._finish(acc, c, 1)


class QLinear(_QWeighted):
    def __init__(self, qat: nn.Module) -> None:
        super().__init__(qat, qat.weight, qat.activation)

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        c = self._prep(x)
        if "w_t" not in c:
            w = self.weight.t().contiguous()
            c["w_t"] = w if c["method"] == "int_mm" else w.to(torch.int64)
        acc = fp.linear(x.q, c["w_t"], c["method"])
        return self._finish(acc, c, acc.dim() - 1)


class QConvTranspose2d(_QWeighted):
    def __init__(self, qat: nn.Module) -> None:
        super().__init__(qat, qat._weight_oc_first(), None)
        self.stride, self.padding, self.dilation = qat.stride, qat.padding, qat.dilation
        self.output_padding, self.groups = qat.output_padding, qat.groups
        self.weight_shape = tuple(qat.weight.shape)

    def _method(self, in_dtype: str) -> str:
        return "float64"

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        c = self._prep(x)
        if "w_t" not in c:  # back to the [Cin, Cout/g, kh, kw] layout of conv_transpose2d
            g, w = self.groups, self.weight
            c["w_t"] = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2).reshape(
                self.weight_shape)
        acc = fp.conv_transpose2d(x.q, c["w_t"], self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)
        return self._finish(acc, c, 1)


class QLookupTable(QModule):
    """Sigmoid, Tanh, SiLU, Hardswish, Hardsigmoid by a table over every input value."""

    def __init__(self, kind: str, out_scale: torch.Tensor, out_dtype: str) -> None:
        super().__init__(out_scale, out_dtype)
        self.kind = kind

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        key = _key(x)
        table = self._cache.get(key)
        if table is None:
            table = self._cache[key] = fp.lut_table(self.kind, x.scale, x.dtype,
                                                    self.out_scale, self.out_dtype)
        idx = x.q.to(torch.int64) - qrange(x.dtype)[0]
        return QTensor(table[idx], self.out_scale, self.out_dtype)


class QClamp(QModule):
    """Standalone ReLU6/Hardtanh: clamp at the input scale, then requantize (section 7)."""

    def __init__(self, lo: float, hi: float, out_scale: torch.Tensor, out_dtype: str) -> None:
        super().__init__(out_scale, out_dtype)
        self.lo, self.hi = lo, hi

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        s_in = float(x.scale)
        q = x.q.to(torch.int64).clamp(round(self.lo / s_in), round(self.hi / s_in))
        return self._out(fp.requant(q, fp.real_multiplier(x.scale, divide_by=self.out_scale)))


class QAvgPool2d(QModule):
    """Window sum (exact) then requant by ``s_in / (kh * kw) / s_o`` (section 9)."""

    def __init__(self, kernel: Any, stride: Any, padding: Any, out_scale: torch.Tensor,
                 out_dtype: str, adaptive_out: Any = None) -> None:
        super().__init__(out_scale, out_dtype)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.adaptive_out = adaptive_out

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        kernel, stride, padding = self.kernel, self.stride, self.padding
        if self.adaptive_out is not None:
            kernel = _adaptive_kernel(x.q.shape[-2:], self.adaptive_out)
            stride, padding = kernel, 0
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        acc = torch.nn.functional.avg_pool2d(x.q.to(torch.float64), kernel, stride, padding,
                                             divisor_override=1).to(torch.int64)
        M = torch.tensor(float(x.scale), dtype=torch.float64) / float(kh * kw) / float(
            self.out_scale)
        return self._out(fp.requant(acc, M))


def _adaptive_kernel(hw: Any, out: Any) -> tuple[int, int]:
    out = (out, out) if isinstance(out, int) else tuple(hw[i] if o is None else o
                                                      for i, o in enumerate(out))
    if hw[0] % out[0] or hw[1] % out[1]:
        raise fail("QK106", f"AdaptiveAvgPool2d from {tuple(hw)} to {out}: the input size must "
                   "be a multiple of the output size for an exact integer average.",
                   "use an input size divisible by the output size, or AvgPool2d")
    return hw[0] // out[0], hw[1] // out[1]


class QUpsampleBilinear(QModule):
    """Bilinear resize with Q8 interpolation weights per axis (section 9)."""

    def __init__(self, size: Any, scale_factor: Any, align_corners: bool,
                 out_scale: torch.Tensor, out_dtype: str,
                 recompute_scale_factor: bool | None = None) -> None:
        super().__init__(out_scale, out_dtype)
        self.size, self.scale_factor, self.align_corners = size, scale_factor, bool(align_corners)
        self.recompute_scale_factor = recompute_scale_factor

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        h, w = x.q.shape[-2:]
        sh = sw = None  # PyTorch's source-index rule uses a given scale factor (section 9)
        if self.size is not None:
            oh, ow = (self.size, self.size) if isinstance(self.size, int) else self.size
        else:
            sf = self.scale_factor
            sh, sw = (sf, sf) if not isinstance(sf, (tuple, list)) else sf
            oh, ow = int(h * sh), int(w * sw)
            if self.recompute_scale_factor:
                sh = sw = None
        y0, y1, wy = fp.bilinear_taps(h, oh, self.align_corners, sh)
        x0, x1, wx = fp.bilinear_taps(w, ow, self.align_corners, sw)
        q = x.q.to(torch.int64)
        rows = q[..., y0, :] * (256 - wy)[:, None] + q[..., y1, :] * wy[:, None]
        acc = rows[..., x0] * (256 - wx) + rows[..., x1] * wx
        M = torch.tensor(float(x.scale), dtype=torch.float64) / 65536 / float(self.out_scale)
        return self._out(fp.requant(acc, M))


class QFunctional(QModule):
    """FloatFunctional's methods in fixed point (sections 6 and 8)."""

    def __init__(self, out_scale: torch.Tensor, out_dtype: str, fused_activation: str | None
                 ) -> None:
        super().__init__(out_scale, out_dtype)
        self.fused_activation = fused_activation

    def forward(self, *args: Any) -> None:
        raise fail("QK000", "FloatFunctional is not called directly.", "call one of its methods")

    def _rq(self, x: QTensor, *mult: Any, divide: Any = None) -> torch.Tensor:
        M = fp.real_multiplier(x.scale, *mult, divide_by=self.out_scale if divide is None
                               else divide)
        return fp.requant(x.q, M, x.axis)

    def _fin(self, q: torch.Tensor, op: str, inputs: tuple) -> QTensor:
        out = self._out(q)
        if self.fused_activation == "relu" or op == "add_relu":
            out.q.clamp_(min=0)
        rec = recorder.active()
        if rec is not None:
            rec.functional(self, op, tuple(inputs), out)
        return out

    def _add(self, a: QTensor, b: QTensor | None, c: float | None, sign: int, op: str
             ) -> QTensor:
        a = _need_q(a, self, per_tensor=False)
        s_i = torch.tensor(float(self.out_scale), dtype=torch.float64) / 256
        # operands are int8/int16/int32, so their requants are exact in float64; their sum is
        # below 2^48 and the final requant by 2^-8 is floor(total / 256 + 1/2), exact too
        ai = fp.requant_float(a.q, a.scale.to(torch.float64) / s_i, a.axis)
        if b is not None:
            b = _need_q(b, self, per_tensor=False)
            bi = fp.requant_float(b.q, b.scale.to(torch.float64) / s_i, b.axis)
            ai = ai.add_(bi, alpha=sign) if ai.shape == torch.broadcast_shapes(
                ai.shape, bi.shape) else ai.add(bi, alpha=sign)
        else:
            ai.add_(round(float(c) / float(s_i)))
        total = ai.mul_(2.0**-8).add_(0.5).floor_()
        return self._fin(total, op, (a,) if b is None else (a, b))

    def add(self, a: QTensor, b: QTensor) -> QTensor:
        return self._add(a, b, None, 1, "add")

    def add_relu(self, a: QTensor, b: QTensor) -> QTensor:
        return self._add(a, b, None, 1, "add_relu")

    def sub(self, a: QTensor, b: QTensor) -> QTensor:
        return self._add(a, b, None, -1, "sub")

    def add_scalar(self, a: QTensor, c: float) -> QTensor:
        return self._add(a, None, c, 1, "add_scalar")

    def mul(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = _need_q(a, self), _need_q(b, self)
        prod = a.q.to(torch.int64) * b.q.to(torch.int64)
        M = fp.real_multiplier(a.scale, b.scale, divide_by=self.out_scale)
        return self._fin(fp.requant(prod, M), "mul", (a, b))

    def mul_scalar(self, a: QTensor, c: float) -> QTensor:
        a = _need_q(a, self)
        M = a.scale.to(torch.float32).to(torch.float64) * float(c) / float(self.out_scale)
        return self._fin(fp.requant(a.q, M), "mul_scalar", (a,))

    def matmul(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = _need_q(a, self), _need_q(b, self)
        # int8 x int8 -> int32 is exact while k * 128 * 128 < 2^31
        if a.q.dim() == 2 and b.q.dim() == 2 and a.dtype == b.dtype == "qint8" \
                and a.q.shape[1] * 2**14 < fp.INT32_EXACT:
            acc = torch._int_mm(fp.canonical(a.q), fp.canonical(b.q))
        else:  # products < 2^31, sums < 2^53: exact in float64
            acc = torch.matmul(a.q.to(torch.float64), b.q.to(torch.float64)).to(torch.int64)
        M = fp.real_multiplier(a.scale, b.scale, divide_by=self.out_scale)
        return self._fin(fp.requant(acc, M), "matmul", (a, b))

    def sum(self, a: QTensor, dim: Any, keepdim: bool = False) -> QTensor:
        a = _need_q(a, self)
        acc = a.q.to(torch.int64).sum(dim, keepdim=keepdim)
        M = fp.real_multiplier(a.scale, divide_by=self.out_scale)
        return self._fin(fp.requant(acc, M), "sum", (a,))

    def mean(self, a: QTensor, dim: Any, keepdim: bool = False) -> QTensor:
        a = _need_q(a, self)
        acc = a.q.to(torch.int64).sum(dim, keepdim=keepdim)
        n = a.q.numel() // max(acc.numel(), 1)
        M = a.scale.to(torch.float64) / float(n) / float(self.out_scale)
        return self._fin(fp.requant(acc, M), "mean", (a,))

    def _same_scale(self, xs: Any) -> list[torch.Tensor]:
        return [fp.saturate(self._rq(_need_q(x, self)), self.out_dtype) for x in xs]

    def maximum(self, a: QTensor, b: QTensor) -> QTensor:
        qa, qb = self._same_scale((a, b))
        return self._fin(torch.maximum(qa, qb), "maximum", (a, b))

    def minimum(self, a: QTensor, b: QTensor) -> QTensor:
        qa, qb = self._same_scale((a, b))
        return self._fin(torch.minimum(qa, qb), "minimum", (a, b))

    def cat(self, xs: Any, dim: int = 0) -> QTensor:
        return self._fin(torch.cat(self._same_scale(xs), dim), "cat", tuple(xs))

    concat = cat

    def stack(self, xs: Any, dim: int = 0) -> QTensor:
        return self._fin(torch.stack(self._same_scale(xs), dim), "stack", tuple(xs))
