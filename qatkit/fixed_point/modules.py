"""Fixed-point forms of the operators: integer tensors (QTensor) in, integer tensors out.

Each module holds what ``docs/fixed-point.md`` needs (int8 weights, per-channel weight scales,
the float bias to be quantized at the input scale, the output scale and dtype) and computes with
``qatkit.fixed_point.kernels``. Quantities that depend on the input scale (int32 bias, multipliers,
lookup tables) are computed on the first call with a given input scale and cached.

``torch.export.export`` traces ``forward`` with fake tensors, where no tensor may be turned into
a Python number. So every number derived from scales and weights (multipliers, shifts, clamp
bounds, tables) is computed in :func:`constants`, on the real tensors the module holds (its
buffers as last assigned outside tracing), and cached per input scale; ``forward`` itself only
does tensor arithmetic with them. The integers are the same either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from qatkit.base import recorder
from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import TORCH_DTYPE, qrange, quantize
from qatkit.fixed_point import epilogue, gemm
from qatkit.fixed_point import kernels as fp
from qatkit.fixed_point.f16_math import gemm_output


def _need_q(x: Any, who: nn.Module, per_tensor: bool = True) -> QTensor:
    if isinstance(x, torch.Tensor) and x.dtype == torch.float16:
        raise fail("QK102", f"{type(who).__name__} is an integer operator and received the "
                   "float16 output of a float16 operator: float16 -> integer is an explicit "
                   "quantization (docs/fixed-point.md section 19).",
                   "put a qk.QuantStub between the float16 operator and this one (it "
                   "calibrates the integer scale)")
    if not isinstance(x, QTensor):
        raise fail("QK102", f"{type(who).__name__} received a float tensor in the fixed-point "
                   "model: a value reached a quantized op without passing a QuantStub.",
                   "put a QuantStub on every path by which data enters the quantized region")
    if per_tensor and x.axis is not None:
        raise fail("QK003", f"{type(who).__name__} received a high-precision (int32, "
                   "per-channel) output; such outputs may only feed DeQuantStubs.",
                   "give the producing conv/linear a quantized output, or dequantize first")
    return x


@contextlib.contextmanager
def constants() -> Iterator[None]:
    """Real tensors, nothing traced: where scale-derived constants are computed. Outside
    ``torch.export`` a no-op; inside it, the tracing modes are set aside for the block."""
    if not torch.compiler.is_exporting():
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


def _scale_key(s: torch.Tensor) -> float | tuple[float, ...]:
    with constants():
        return float(s) if s.dim() == 0 else tuple(s.tolist())


def _key(x: QTensor) -> tuple[Any, str]:
    return (_scale_key(x.scale), x.dtype)


def _mn(M: torch.Tensor) -> tuple[int, int]:
    """A per-tensor multiplier as Python ints (see :func:`fp.requant_py`)."""
    m, n = fp.multiplier(M)
    return int(m), int(n)


class QModule(nn.Module):
    _qatkit_leaf = True

    def __init__(self, out_scale: torch.Tensor | None, out_dtype: str) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self._real: dict[str, torch.Tensor | None] = {}
        self.register_buffer("out_scale", None if out_scale is None
                             else out_scale.detach().clone().to(torch.float32))
        self._cache: dict[Any, Any] = {}

    # The real buffers, also while torch.export swaps them for fake tensors (see module doc).
    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True
                        ) -> None:
        super().register_buffer(name, tensor, persistent)
        self._real[name] = tensor

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dict__.get("_buffers", {}) and not torch.compiler.is_exporting():
            self._real[name] = value

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # .to(device) / .cuda(): the cached int32 bias, multipliers and weight matrices were
        # made on the old device; they are made again from the moved buffers on the next call
        self._cache = {}
        out = super()._apply(fn, recurse)
        self._real.update(self._buffers)
        return out

    def real(self, name: str) -> Any:
        """Buffer ``name`` as a real tensor (the buffer itself outside torch.export)."""
        return getattr(self, name) if not torch.compiler.is_exporting() else self._real[name]

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` (run under :func:`constants`) cached per ``key``."""
        c = self._cache.get(key)
        if c is None:
            with constants():
                c = self._cache[key] = build()
        return c

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _out(self, q: torch.Tensor) -> QTensor:
        return QTensor(fp.saturate(q, self.out_dtype), self.real("out_scale"), self.out_dtype)


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
        s = self.real("out_scale")
        q = quantize(x, s, self.out_dtype)
        return QTensor(q.to(TORCH_DTYPE[self.out_dtype]), s, self.out_dtype)


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
        if isinstance(x, torch.Tensor) and x.dtype == torch.float16:  # a float16 op's output
            return x.to(torch.float32)  # exact
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

    # a target profile's requantization in place of section 4's (set by qk.convert(...,
    # profile=...); see qatkit/fixed_point/ort_profile.py); None: qatkit's own arithmetic
    profile: str | None = None

    def __init__(self, qat: nn.Module, w_oc_first: torch.Tensor, activation: str | None
                 ) -> None:
        """``qat``: the QAT module; ``w_oc_first``: its weight with output channels first."""
        app = qat.activation_post_process
        super().__init__(None if app is None or app.is_float16 else app.scale,
                         "qint32" if app is None else app.dtype)
        bias = qat.bias
        s_w = qat.weight_fake_quant.weight_scale(w_oc_first, bias)  # zero channels: section 5
        self.qualified_name = ""  # convert names it, for errors about this module
        self.output_mode, self.activation = qat.output_mode, activation
        self.register_buffer("weight_scale", s_w.detach().clone().to(torch.float32))
        self.register_buffer("weight", self._stored_weight(fp.quantize_weight(
            w_oc_first.detach(), s_w, qat.weight_fake_quant.dtype), qat))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def _prep(self, x: QTensor) -> dict[str, Any]:
        return self.cached(_key(x), lambda: self._constants(x))

    def _constants(self, x: QTensor) -> dict[str, Any]:
        s_in = x.scale.detach().to(torch.float32)
        weight, s_w, s_o = self.real("weight"), self.real("weight_scale"), self.real("out_scale")
        bias = self.real("bias")
        b = bias if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        q_b = fp.bias_integers(b, s_in, s_w, self._who())
        c = {"q_b": q_b.to(torch.int64) if fp.fits_int32(q_b) else None, "wide": None,
             "method": fp.conv_method(weight, x.dtype, getattr(self, "groups", 1))
             if not isinstance(self, QConvTranspose2d) else fp.transposed_method(weight, x.dtype)}
        if c["q_b"] is None:  # a bias beyond int32 at s_in * s_w: spec section 5, exactly
            self._wide_constants(c, q_b, x, s_in, s_w, s_o)
        elif self.requantizes:
            c["mn"] = fp.multiplier(fp.real_multiplier(s_in, s_w, divide_by=s_o))
            c["clamp"] = _clamp_bounds(self.activation, float(s_o),
                                       self.out_dtype) or qrange(self.out_dtype)
            # the same integers through float64 where provably exact (spec section 12)
            c["f64"] = fp.requant_plan(*c["mn"], c["q_b"], fp.acc_bound(weight, x.dtype))
        else:
            c["acc_scale"] = fp.accumulator_scale(s_in, s_w)
            # int32 output: checked on every call unless a static bound proves it fits
            c["check"] = fp.acc_bound(weight, x.dtype) + int(
                c["q_b"].abs().max()) >= fp.INT32_EXACT
        c["w"] = self._prepared_weight(weight, c["method"])
        c["chunks"] = fp.f32_chunks(weight, x.dtype) if c["method"] == "float32_split" else None
        if self.profile is not None:
            c["ort_scale"] = fp.ort_constants(weight, x.dtype, q_b, s_in, s_w, s_o,
                                              self._who())
        return c

    def _wide_constants(self, c: dict[str, Any], q_b: torch.Tensor, x: QTensor,
                        s_in: torch.Tensor, s_w: torch.Tensor, s_o: torch.Tensor | None
                        ) -> None:
        """A bias int32 cannot hold at the accumulator scale (spec section 5): a quantized
        output adds it exactly in the requantization (bias at the output scale + rounding
        addend); an int32 output (high-precision, or feeding an add) is shifted right by the
        channel's ``k`` and its scale is ``s_acc * 2^k``."""
        bounds = fp.channel_bounds(self.real("weight"), x.dtype)
        if self.requantizes:
            m, n = c["mn"] = fp.multiplier(fp.real_multiplier(s_in, s_w, divide_by=s_o))
            c["clamp"] = _clamp_bounds(self.activation, float(s_o),
                                       self.out_dtype) or qrange(self.out_dtype)
            c["f64"] = None
        else:
            k = fp.int32_shifts(q_b)
            m, n = torch.full_like(k, 2**14), k + 14  # M = 2^-k
            c["acc_scale"] = fp.accumulator_scale(s_in, s_w) * torch.exp2(k.to(torch.float32))
            c["check"] = True
        c["wide"] = fp.wide_plan(q_b, m, n, bounds, self._who())

    def _stored_weight(self, q_w: torch.Tensor, qat: nn.Module) -> torch.Tensor:
        """The ``weight`` buffer: ``q_w`` itself, or a view of it in the kernel's layout, so
        that :meth:`_prepared_weight` is a view of the buffer, not a second copy of it.
        ``load_state_dict`` copies into the buffer in place, keeping that layout; the
        state_dict holds the documented shape and dtype whatever the strides."""
        return q_w

    def _prepared_weight(self, weight: torch.Tensor, method: str) -> torch.Tensor:
        """The weights in the layout the kernel of ``method`` reads."""
        raise NotImplementedError

    @property
    def requantizes(self) -> bool:
        """An int8/int16 output (not int32, not the float16 output of section 19)."""
        return self.output_mode == "quantized" and self.out_dtype != "float16"

    def _float16(self, acc: torch.Tensor, acc_scale: torch.Tensor, axis: int) -> torch.Tensor:
        return gemm_output(acc, acc_scale, axis, self.activation, self._who())

    def _who(self) -> str:
        name = getattr(self, "qualified_name", "")
        return f"{type(self).__name__} {name!r}" if name else type(self).__name__

    def _finish(self, acc: torch.Tensor, c: dict[str, Any], axis: int) -> QTensor:
        if self.profile is not None:
            v = acc.to(torch.int64) + fp.along(c["q_b"], axis, acc.dim())
            return self._out(fp.ort_requant(v, c["ort_scale"], axis).clamp_(*c["clamp"]))
        if c["wide"] is not None:
            q = fp.requant_wide(acc, c["wide"], axis)
            if self.requantizes:
                return self._out(q.clamp(*c["clamp"]))
            fp.check_int32(q, self._who())
            if self.out_dtype == "float16":
                return self._float16(q, c["acc_scale"], axis)
            return QTensor(q.to(torch.int32), c["acc_scale"], "qint32", axis=axis)
        if self.requantizes and c["f64"] is not None:
            if epilogue.use_compiled(acc):  # one fused pass, the same integers
                mult, addend = (fp.along(t, axis, acc.dim()) for t in c["f64"])
                q = epilogue.conv_requant(acc, mult, addend, *c["clamp"],
                                          TORCH_DTYPE[self.out_dtype])
            else:
                q = fp.requant_f64(acc, c["f64"], *c["clamp"], self.out_dtype, axis)
            return QTensor(q, self.real("out_scale"), self.out_dtype)
        acc = acc.to(torch.int64) + fp.along(c["q_b"], axis, acc.dim())
        if not self.requantizes:
            if c["check"]:
                fp.check_int32(acc, self._who())
            if self.out_dtype == "float16":
                return self._float16(acc, c["acc_scale"], axis)
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
        acc = fp.conv2d(x.q, self.real("weight"), self.stride, self.padding, self.dilation,
                        self.groups, c["method"], c["w"], c["chunks"])
        return self._finish(acc, c, 1)

    def _stored_weight(self, q_w: torch.Tensor, qat: nn.Module) -> torch.Tensor:
        # int8 weights of an ungrouped conv feed _int_mm: kept as its [kh*kw*C, O] matrix
        if q_w.dtype == torch.int8 and qat.groups == 1:
            return fp.columns_as_weight(fp.weight_columns(q_w), q_w.shape)
        return q_w

    def _prepared_weight(self, weight: torch.Tensor, method: str) -> torch.Tensor | None:
        return fp.prepared_weight(weight, method)


class QLinear(_QWeighted):
    def __init__(self, qat: nn.Module) -> None:
        super().__init__(qat, qat.weight, qat.activation)

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        c = self._prep(x)
        acc = fp.linear(x.q, c["w"], c["method"], c["chunks"])
        return self._finish(acc, c, acc.dim() - 1)

    def _stored_weight(self, q_w: torch.Tensor, qat: nn.Module) -> torch.Tensor:
        return q_w.t().contiguous().t()  # the [K, O] matrix the kernels read, viewed as [O, K]

    def _prepared_weight(self, weight: torch.Tensor, method: str) -> torch.Tensor:
        w = weight.t().contiguous()  # a view of the buffer (see _stored_weight)
        return w  # float methods cast it at each call (see fp.prepared_weight)


class QConvTranspose2d(_QWeighted):
    def __init__(self, qat: nn.Module) -> None:
        super().__init__(qat, qat._weight_oc_first(), None)
        self.stride, self.padding, self.dilation = qat.stride, qat.padding, qat.dilation
        self.output_padding, self.groups = qat.output_padding, qat.groups
        self.weight_shape = tuple(qat.weight.shape)

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        c = self._prep(x)
        acc = fp.conv_transpose2d(x.q, c["w"], self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)
        return self._finish(acc, c, 1)

    def _prepared_weight(self, weight: torch.Tensor, method: str) -> torch.Tensor:
        g = self.groups  # back to the [Cin, Cout/g, kh, kw] layout of conv_transpose2d
        return weight.reshape(g, weight.shape[0] // g, *weight.shape[1:]).transpose(1, 2).reshape(
            self.weight_shape)


class QLookupTable(QModule):
    """Sigmoid, Tanh, SiLU, Hardswish, Hardsigmoid by a table over every input value."""

    def __init__(self, kind: str, out_scale: torch.Tensor, out_dtype: str) -> None:
        super().__init__(out_scale, out_dtype)
        self.kind = kind

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        table = self.table(x)
        idx = x.q.to(torch.int64) - qrange(x.dtype)[0]
        return QTensor(table[idx], self.real("out_scale"), self.out_dtype)


    def table(self, x: QTensor) -> torch.Tensor:
        """The table for ``x``'s scale and dtype, indexed by ``q - qmin``."""
        return self.cached(_key(x), lambda: fp.lut_table(
            self.kind, x.scale, x.dtype, self.real("out_scale"), self.out_dtype))


class QClamp(QModule):
    """Standalone ReLU6/Hardtanh: clamp at the input scale, then requantize (section 7)."""

    def __init__(self, lo: float, hi: float, out_scale: torch.Tensor, out_dtype: str) -> None:
        super().__init__(out_scale, out_dtype)
        self.lo, self.hi = lo, hi

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        lo, hi, m, n = self.params(x)
        return self._out(fp.requant_py(x.q.to(torch.int64).clamp(lo, hi), m, n))

    def params(self, x: QTensor) -> tuple[int, int, int, int]:
        """Clamp bounds at the input scale and the requant multiplier ``(lo, hi, m, n)``."""
        return self.cached(_key(x), lambda: self._constants(x))

    def _constants(self, x: QTensor) -> tuple[int, int, int, int]:
        s_in = float(x.scale)
        return (round(self.lo / s_in), round(self.hi / s_in),
                *_mn(fp.real_multiplier(x.scale, divide_by=self.real("out_scale"))))


class QAvgPool2d(QModule):
    """Window sum (exact) then requant by ``s_in / (kh * kw) / s_o`` (section 9)."""

    def __init__(self, kernel: Any, stride: Any, padding: Any, out_scale: torch.Tensor,
                 out_dtype: str, adaptive_out: Any = None) -> None:
        super().__init__(out_scale, out_dtype)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.adaptive_out = adaptive_out

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        repeat = self.replication(x)
        if repeat is not None:  # every window holds one element: a copy, requantized
            q = x.q.to(torch.int64).repeat_interleave(repeat[0], -2)
            m, n = self.cached((*_key(x), 1), lambda: _mn(torch.tensor(
                float(x.scale), dtype=torch.float64) / float(self.real("out_scale"))))
            return self._out(fp.requant_py(q.repeat_interleave(repeat[1], -1), m, n))
        kernel, stride, padding, m, n = self.params(x)
        acc = torch.nn.functional.avg_pool2d(x.q.to(torch.float64), kernel, stride, padding,
                                             divisor_override=1).to(torch.int64)
        return self._out(fp.requant_py(acc, m, n))

    def replication(self, x: QTensor) -> tuple[int, int] | None:
        """``(k_h, k_w)`` when an adaptive pool's output size is a multiple of its input size
        (VGG's pool to 7x7 of a 1x1 map): each output window is exactly one input element."""
        if self.adaptive_out is None:
            return None
        hw = x.q.shape[-2:]
        out = _adaptive_out(hw, self.adaptive_out)
        if out[0] % hw[0] or out[1] % hw[1] or tuple(out) == tuple(hw):
            return None
        return out[0] // hw[0], out[1] // hw[1]

    def params(self, x: QTensor) -> tuple[Any, Any, Any, int, int]:
        """``(kernel, stride, padding, m, n)`` for the input ``x``."""
        kernel, stride, padding = self.kernel, self.stride, self.padding
        if self.adaptive_out is not None:
            kernel = _adaptive_kernel(x.q.shape[-2:], self.adaptive_out)
            stride, padding = kernel, 0
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        m, n = self.cached((*_key(x), kh * kw), lambda: _mn(torch.tensor(
            float(x.scale), dtype=torch.float64) / float(kh * kw) / float(
            self.real("out_scale"))))
        return kernel, stride, padding, m, n


def _adaptive_out(hw: Any, out: Any) -> tuple[int, int]:
    return (out, out) if isinstance(out, int) else tuple(hw[i] if o is None else o
                                                         for i, o in enumerate(out))


def _adaptive_kernel(hw: Any, out: Any) -> tuple[int, int]:
    out = _adaptive_out(hw, out)
    if hw[0] % out[0] or hw[1] % out[1]:
        raise fail("QK106", f"AdaptiveAvgPool2d from {tuple(hw)} to {out}: the input size must "
                   "be a multiple of the output size (or the output a multiple of the input) "
                   "for an exact integer average.",
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
        (y0, y1, wy), (x0, x1, wx), (m, n) = self.params(x)
        q = x.q.to(torch.int64)
        rows = q[..., y0, :] * (256 - wy)[:, None] + q[..., y1, :] * wy[:, None]
        acc = rows[..., x0] * (256 - wx) + rows[..., x1] * wx
        return self._out(fp.requant_py(acc, m, n))

    def params(self, x: QTensor) -> tuple[Any, Any, tuple[int, int]]:
        """The taps ``(i0, i1, w1)`` of each axis and the requant multiplier ``(m, n)``."""
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
        dev = x.q.device
        y0, y1, wy = (t.to(dev) for t in fp.bilinear_taps(h, oh, self.align_corners, sh))
        x0, x1, wx = (t.to(dev) for t in fp.bilinear_taps(w, ow, self.align_corners, sw))
        mn = self.cached(_key(x), lambda: _mn(torch.tensor(
            float(x.scale), dtype=torch.float64) / 65536 / float(self.real("out_scale"))))
        return (y0, y1, wy), (x0, x1, wx), mn


class QFunctional(QModule):
    """FloatFunctional's methods in fixed point (sections 6 and 8)."""

    def __init__(self, out_scale: torch.Tensor, out_dtype: str, fused_activation: str | None
                 ) -> None:
        super().__init__(out_scale, out_dtype)
        self.fused_activation = fused_activation

    def forward(self, *args: Any) -> None:
        raise fail("QK000", "FloatFunctional is not called directly.", "call one of its methods")

    def rq_mn(self, x: QTensor) -> tuple[int, int]:
        """``s_x / s_o`` as Python ints, cached per input scale."""
        return self.cached(("rq", *_key(x)), lambda: _mn(fp.real_multiplier(
            x.scale, divide_by=self.real("out_scale"))))

    def _fin(self, q: torch.Tensor, op: str, inputs: tuple, **arguments: Any) -> QTensor:
        out = self._out(q)
        if self.relu_after(op):
            out.q.clamp_(min=0)
        return self._record(out, op, inputs, **arguments)

    def _record(self, out: QTensor, op: str, inputs: tuple, **arguments: Any) -> QTensor:
        rec = recorder.active()
        if rec is not None:  # arguments (dim, scalar...): kept by the trace for exporters
            rec.functional(self, op, tuple(inputs), out, arguments)
        return out

    def relu_after(self, op: str) -> bool:
        """Whether a ReLU follows the saturation (fused add+relu, or ``add_relu``)."""
        return self.fused_activation == "relu" or op == "add_relu"

    def _add(self, a: QTensor, b: QTensor | None, c: float | None, sign: int, op: str
             ) -> QTensor:
        a = _need_q(a, self, per_tensor=False)
        if b is not None:
            b = _need_q(b, self, per_tensor=False)
        pa, pb = self.add_plans(a, b, c)
        if b is not None and pa[0] is not None and pb[0] is not None \
                and epilogue.use_compiled(a.q):  # one fused pass, the same integers
            lo, hi = qrange(self.out_dtype)
            q = epilogue.add_requant(
                a.q, fp.along(pa[0].to(a.q.device), a.axis, a.q.dim()), b.q,
                fp.along(pb[0].to(b.q.device), b.axis, b.q.dim()), sign,
                max(lo, 0) if self.relu_after(op) else lo, hi, TORCH_DTYPE[self.out_dtype])
            return self._record(QTensor(q, self.real("out_scale"), self.out_dtype), op, (a, b),
                                c=c)
        # operands are int8/int16/int32, so their requants are exact in float64; their sum is
        # below 2^48 and the final requant by 2^-8 is floor(total / 256 + 1/2), exact too
        ai = fp.requant_float_plan(a.q, pa, a.axis)
        if b is not None:
            bi = fp.requant_float_plan(b.q, pb, b.axis)
            ai = ai.add_(bi, alpha=sign) if ai.shape == torch.broadcast_shapes(
                ai.shape, bi.shape) else ai.add(bi, alpha=sign)
        else:
            ai.add_(pb)
        total = ai.mul_(2.0**-8).add_(0.5).floor_()
        return self._fin(total, op, (a,) if b is None else (a, b), c=c)

    def add_plans(self, a: QTensor, b: QTensor | None, c: float | None) -> tuple[Any, Any]:
        """:func:`fp.float_plan` of each operand to ``s_i`` (a scalar: its integer at ``s_i``)."""
        return self.cached(("add", *_key(a), None if b is None else _key(b), c),
                           lambda: self._add_constants(a, b, c))

    def _add_constants(self, a: QTensor, b: QTensor | None, c: float | None) -> tuple[Any, Any]:
        """The requant plans of both operands to ``s_i = s_o / 256`` (or the scalar's value
        at ``s_i``)."""
        s_i = torch.tensor(float(self.real("out_scale")), dtype=torch.float64) / 256
        pa = fp.float_plan(a.scale.to(torch.float64) / s_i)
        if b is None:
            return pa, round(float(c) / float(s_i))
        return pa, fp.float_plan(b.scale.to(torch.float64) / s_i)

    def add(self, a: QTensor, b: QTensor) -> QTensor:
        return self._add(a, b, None, 1, "add")

    def add_relu(self, a: QTensor, b: QTensor) -> QTensor:
        return self._add(a, b, None, 1, "add_relu")

    def sub(self, a: QTensor, b: QTensor) -> QTensor:
        return self._add(a, b, None, -1, "sub")

    def add_scalar(self, a: QTensor, c: float) -> QTensor:
        return self._add(a, None, c, 1, "add_scalar")

    def prod_mn(self, a: QTensor, b: QTensor) -> tuple[int, int]:
        return self.cached(("prod", *_key(a), *_key(b)), lambda: _mn(fp.real_multiplier(
            a.scale, b.scale, divide_by=self.real("out_scale"))))

    def mul(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = _need_q(a, self), _need_q(b, self)
        prod = a.q.to(torch.int64) * b.q.to(torch.int64)
        return self._fin(fp.requant_py(prod, *self.prod_mn(a, b)), "mul", (a, b))

    def mul_scalar(self, a: QTensor, c: float) -> QTensor:
        a = _need_q(a, self)
        return self._fin(fp.requant_py(a.q, *self.mul_scalar_mn(a, c)), "mul_scalar", (a,), c=c)

    def mul_scalar_mn(self, a: QTensor, c: float) -> tuple[int, int]:
        return self.cached(("mul_scalar", *_key(a), c), lambda: _mn(
            a.scale.to(torch.float32).to(torch.float64) * float(c)
            / float(self.real("out_scale"))))

    def matmul(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = _need_q(a, self), _need_q(b, self)
        # int8 x int8: every partial sum is at most k * 128 * 128 in magnitude, so int32
        # sums are exact below 2^31 and float32 sums below 2^24 (spec section 12)
        int8, bound = a.dtype == b.dtype == "qint8", a.q.shape[-1] * 2**14
        two_d = a.q.dim() == 2 and b.q.dim() == 2
        if int8 and bound < fp.F32_EXACT and (
                not two_d or gemm.engine(a.q.device) == "float32"):
            with fp.no_tf32():
                acc = torch.matmul(a.q.to(torch.float32), b.q.to(torch.float32)).to(torch.int64)
        elif int8 and two_d and bound < fp.INT32_EXACT:
            acc = fp.int_mm(fp.canonical(a.q), fp.canonical(b.q))
        else:  # products < 2^31, sums < 2^53: exact in float64
            acc = torch.matmul(a.q.to(torch.float64), b.q.to(torch.float64)).to(torch.int64)
        return self._fin(fp.requant_py(acc, *self.prod_mn(a, b)), "matmul", (a, b))

    def sum(self, a: QTensor, dim: Any, keepdim: bool = False) -> QTensor:
        a = _need_q(a, self)
        acc = a.q.to(torch.int64).sum(dim, keepdim=keepdim)
        return self._fin(fp.requant_py(acc, *self.rq_mn(a)), "sum", (a,), dim=dim,
                         keepdim=keepdim)

    def mean(self, a: QTensor, dim: Any, keepdim: bool = False) -> QTensor:
        a = _need_q(a, self)
        acc = a.q.to(torch.int64).sum(dim, keepdim=keepdim)
        n = a.q.numel() // max(acc.numel(), 1)
        return self._fin(fp.requant_py(acc, *self.mean_mn(a, n)), "mean", (a,), dim=dim,
                         keepdim=keepdim)

    def mean_mn(self, a: QTensor, n: int) -> tuple[int, int]:
        """``s / n / s_o`` for a mean over ``n`` elements."""
        return self.cached(("mean", *_key(a), n), lambda: _mn(
            a.scale.to(torch.float64) / float(n) / float(self.real("out_scale"))))

    def _same_scale(self, xs: Any) -> list[torch.Tensor]:
        out = []
        for x in xs:
            x = _need_q(x, self)
            out.append(fp.saturate(fp.requant_py(x.q, *self.rq_mn(x)), self.out_dtype))
        return out

    def maximum(self, a: QTensor, b: QTensor) -> QTensor:
        qa, qb = self._same_scale((a, b))
        return self._fin(torch.maximum(qa, qb), "maximum", (a, b))

    def minimum(self, a: QTensor, b: QTensor) -> QTensor:
        qa, qb = self._same_scale((a, b))
        return self._fin(torch.minimum(qa, qb), "minimum", (a, b))

    def cat(self, xs: Any, dim: int = 0) -> QTensor:
        return self._fin(torch.cat(self._same_scale(xs), dim), "cat", tuple(xs), dim=dim)

    concat = cat

    def stack(self, xs: Any, dim: int = 0) -> QTensor:
        return self._fin(torch.stack(self._same_scale(xs), dim), "stack", tuple(xs), dim=dim)


# ---------------------------------------------------------------------------------------------
# PReLU / LeakyReLU, Softmax, LayerNorm, AvgPool2d with per-position divisors (sections 14-17).
# Each is built from the op's parameters alone, so that a module call and a functional call
# site (F.leaky_relu, F.prelu, F.softmax, F.layer_norm, F.avg_pool2d) make the same module.


class QPReLU(QModule):
    """PReLU (slope per channel along axis 1, or one slope) and LeakyReLU (section 14)."""

    def __init__(self, slope: torch.Tensor | float, out_scale: torch.Tensor, out_dtype: str
                 ) -> None:
        super().__init__(out_scale, out_dtype)
        slope = torch.as_tensor(slope, dtype=torch.float32).detach().clone().reshape(-1)
        self.register_buffer("slope", slope)

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        key = _key(x)
        c = self._cache.get(key)
        if c is None:
            if self.slope.numel() > 1 and (x.q.dim() < 2 or x.q.shape[1] != self.slope.numel()):
                raise fail("QK106", f"PReLU with {self.slope.numel()} slopes received a tensor "
                           f"of shape {tuple(x.q.shape)} (channels are axis 1).",
                           "use num_parameters equal to the channel count, or 1")
            c = self._cache[key] = (
                fp.real_multiplier(x.scale, divide_by=self.out_scale),
                fp.real_multiplier(x.scale, self.slope, divide_by=self.out_scale))
        axis = 1 if self.slope.numel() > 1 else None
        M_neg = c[1] if axis is not None else c[1].reshape(())
        return self._out(fp.prelu(x.q, c[0], M_neg, axis))


class QSoftmax(QModule):
    """Softmax along ``dim`` with a Q15 exp table and an integer division (section 15)."""

    def __init__(self, dim: int, out_scale: torch.Tensor, out_dtype: str) -> None:
        super().__init__(out_scale, out_dtype)
        self.dim = dim

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        key = _key(x)
        c = self._cache.get(key)
        if c is None:
            M = torch.tensor(2.0**-fp.SOFTMAX_FRAC, dtype=torch.float64) / float(self.out_scale)
            c = self._cache[key] = (fp.softmax_exp_table(x.scale, x.dtype), M)
        try:
            q = fp.softmax(x.q, self.dim, *c)
        except ValueError as e:
            raise fail("QK106", f"Softmax: {e}.", "softmax over fewer elements") from None
        return self._out(q)


class QLayerNorm(QModule):
    """LayerNorm over the last ``len(normalized_shape)`` dims, or over ``channel_axis`` (the
    channels-first LayerNorm2d of convnext models), with integer mean/variance, the integer
    rsqrt of section 16, and the affine weight/bias requantized."""

    def __init__(self, normalized_shape: Any, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float, out_scale: torch.Tensor,
                 out_dtype: str, channel_axis: int | None = None) -> None:
        super().__init__(out_scale, out_dtype)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(
            normalized_shape)
        self.normalized_shape, self.eps, self.channel_axis = shape, float(eps), channel_axis
        self.register_buffer("weight", None if weight is None
                             else weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def _dims(self, ndim: int) -> tuple[int, ...]:
        if self.channel_axis is not None:
            return (self.channel_axis,)
        return tuple(range(ndim - len(self.normalized_shape), ndim))

    def _affine_shape(self, ndim: int) -> list[int]:
        if self.channel_axis is None:
            return list(self.normalized_shape)
        shape = [1] * (ndim - self.channel_axis)
        shape[0] = -1
        return shape

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        dims = self._dims(x.q.dim())
        got = tuple(x.q.shape[d] for d in dims)
        if got != self.normalized_shape:
            raise fail("QK106", f"LayerNorm over {self.normalized_shape} received a tensor of "
                       f"shape {tuple(x.q.shape)}.", "check the normalized_shape")
        key = (*_key(x), x.q.dim())
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = self._constants(x, dims)
        try:
            y = fp.layer_norm_normalize(x.q, dims, c[0], c[3])
        except ValueError as e:
            raise fail("QK106", f"LayerNorm: {e}.", "normalize over fewer values") from None
        return self._out(fp.layer_norm_affine(y, c[1], c[2]))

    def _constants(self, x: QTensor, dims: tuple[int, ...]) -> tuple:
        n = 1
        for d in dims:
            n *= x.q.shape[d]
        try:
            G = fp.ln_guard_bits(n, x.dtype)
        except ValueError as e:
            raise fail("QK106", f"LayerNorm: {e}.", "normalize over fewer values") from None
        try:
            E = fp.ln_eps_term(self.eps, n, x.scale, G)
        except ValueError as e:
            raise fail("QK103", f"LayerNorm with input scale {float(x.scale):.3g}: {e}.",
                       "calibrate the layer norm's input on real data") from None
        shape = self._affine_shape(x.q.dim())
        s_i = torch.tensor(float(self.out_scale), dtype=torch.float64) / 256
        w = torch.ones(()) if self.weight is None else self.weight
        M_w = (w.to(torch.float64) / 2.0**fp.LN_FRAC / s_i).reshape(shape if w.dim() else ())
        b = torch.zeros(()) if self.bias is None else self.bias
        b_i = torch.round(b.to(torch.float64) / s_i)
        if not bool(torch.isfinite(M_w).all() & torch.isfinite(b_i).all()) or \
                2.0**33 * float(M_w.abs().max()) + float(b_i.abs().max()) >= 2.0**62:
            raise fail("QK103", "LayerNorm weight/bias are too large for the output scale "
                       f"{float(self.out_scale):.3g}: the int64 sum would overflow.",
                       "calibrate the layer norm's output on real data")
        return E, M_w, b_i.to(torch.int64).reshape(shape if b.dim() else ()), G


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class QAvgPool2dDivisor(QModule):
    """AvgPool2d with ``ceil_mode``, ``count_include_pad=False`` or ``divisor_override``: the
    exact window sum, requantized by ``s_in / d / s_o`` with PyTorch's divisor ``d`` of each
    output position (section 17)."""

    def __init__(self, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                 count_include_pad: bool, divisor_override: int | None,
                 out_scale: torch.Tensor, out_dtype: str) -> None:
        super().__init__(out_scale, out_dtype)
        self.kernel = _pair(kernel)
        self.stride = self.kernel if stride is None or stride == [] else _pair(stride)
        self.padding = _pair(padding)
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        self.divisor_override = divisor_override
        if divisor_override is not None and int(divisor_override) <= 0:
            raise fail("QK106", f"AvgPool2d divisor_override={divisor_override}: must be > 0.")

    def forward(self, x: QTensor) -> QTensor:
        x = _need_q(x, self)
        h, w = x.q.shape[-2:]
        key = (*_key(x), h, w)
        mn = self._cache.get(key)
        if mn is None:
            if self.divisor_override is not None:
                d = torch.tensor(float(self.divisor_override), dtype=torch.float64)
            else:
                dh, dw = (fp.avg_pool_divisors(size, k, s, p, self.ceil_mode,
                                               self.count_include_pad)
                          for size, k, s, p in zip((h, w), self.kernel, self.stride,
                                                   self.padding))
                d = (dh[:, None] * dw[None, :]).to(torch.float64)
            M = torch.tensor(float(x.scale), dtype=torch.float64) / d / float(self.out_scale)
            mn = self._cache[key] = fp.multiplier(M)
        acc = torch.nn.functional.avg_pool2d(
            x.q.to(torch.float64), self.kernel, self.stride, self.padding,
            ceil_mode=self.ceil_mode, count_include_pad=True, divisor_override=1
        ).to(torch.int64)  # window sums, exact in float64 (below 2^53)
        return self._out(fp.requant_mn(acc, *mn))
