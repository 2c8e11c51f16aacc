"""The ``qdq`` ONNX flavour: the standard QuantizeLinear/DequantizeLinear form, and its encodings.

Every quantized activation ``(q, s)`` of the fixed-point model becomes ``DequantizeLinear(
QuantizeLinear(x, s, 0), s, 0)`` (symmetric: zero point 0; int8, or int16 at opset 21); every
operator between them runs on the dequantized float32 values, as NPU compilers, TensorRT and
onnxruntime's QDQ fusions expect:

* conv/linear weights are int8 initializers dequantized per output channel (axis 0, scale
  ``s_w[c]``); the bias is the int32 ``q_b`` of ``docs/fixed-point.md`` section 5, dequantized at
  ``float32(s_in * s_w[c])`` (the ONNX rule for QLinearConv/QGemm bias);
* fused ReLU is ``Relu``, fused ReLU6/Hardtanh a ``Clip`` at the bounds on the output grid;
  lookup tables are the float functions (``Sigmoid``, ``Tanh``, ``HardSwish``, GELU as
  ``Gelu`` or its ``Erf``/``Tanh`` form, ...); PReLU/LeakyReLU, Softmax, LayerNorm and pools
  are ``PRelu``/``LeakyRelu``, ``Softmax``, ``LayerNormalization``, ``AveragePool``; resizes,
  adds, concatenations are their float ONNX ops;
* a high-precision (int32 accumulator) output has no QuantizeLinear: the float result of the
  conv/linear goes to the output, as qatkit dequantizes the accumulator.

The arithmetic between QuantizeLinear and DequantizeLinear is the runtime's (onnxruntime
requantizes its fused integer kernels in float32 with round half to even), not qatkit's
16-bit multiplier with round half up, so results may differ by LSBs; ``qatkit verify``
measures by how much, per layer. A model converted with ``profile="onnxruntime"``
(``qatkit/fixed_point/ort_profile.py``) computes that arithmetic itself; its export writes
uint8 activations with zero point 128 (the same values) and each fused ReLU/ReLU6 after the
conv/linear group's own QuantizeLinear, the forms onnxruntime fuses into QLinearConv/QGemm, and
is then identical in onnxruntime. The sidecar encodings (:func:`encodings`) give every tensor's
dtype and scale, like AIMET's ``.encodings`` file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from qatkit.base.qtensor import QTensor
from qatkit.export.onnx_integer import RESHAPES, SPLITS, IntegerExporter, _refuse, layer_key
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
)
from qatkit.quantization import trace as tr

BITS = {"qint8": 8, "qint16": 16, "qint32": 32}


class QdqExporter(IntegerExporter):
    """The walk of :class:`IntegerExporter`, emitting float ops between Q/DQ pairs."""

    FLAVOUR = "qdq"

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        super().__init__(model, example_inputs)
        self.activations: dict[str, dict[str, Any]] = {}
        self.params: dict[str, dict[str, Any]] = {}
        # converted with the onnxruntime profile: activations as uint8 with zero point 128
        # (the same values) so that onnxruntime fuses every conv/linear group (see
        # docs/export.md); the model is then its fused kernels' arithmetic exactly
        self.profile = next((m.profile for m in model.modules()
                             if getattr(m, "profile", None) is not None), None)

    def prepare(self, g: tr.Graph) -> None:
        dtypes = {n.output.dtype for n in g.nodes if isinstance(n.output, QTensor)
                  and n.output.axis is None}
        self.opset = 21 if "qint16" in dtypes else 17  # int16 QuantizeLinear: opset 21

    def extra_props(self) -> dict[str, str]:
        import json
        props = {"qatkit.encodings": json.dumps(self.encodings(), sort_keys=True)}
        if self.profile is not None:
            props["qatkit.profile"] = self.profile
        return props

    def encodings(self) -> dict[str, Any]:
        """Every quantized tensor of the graph: ``{"activation_encodings": {name: {...}},
        "param_encodings": {name: {...}}}``, each with dtype, bitwidth, scale (a list: one per
        channel along ``axis`` for parameters), offset 0 and ``is_symmetric``."""
        return {"version": "qatkit-qdq-1", "activation_encodings": self.activations,
                "param_encodings": self.params}

    # ---- Q/DQ --------------------------------------------------------------------------
    def _zero(self, dtype: str) -> str:
        if self.profile is not None:
            return self.b.const(UINT8_ZERO, np.uint8, "zp")
        return self.b.const(0, np.int8 if dtype == "qint8" else np.int16, "zp")

    def qdq(self, name: str, x: QTensor, label: str) -> tuple[str, str]:
        """``(quantized, dequantized)`` names of ``name`` at ``x``'s scale and dtype."""
        b = self.b
        s = b.const(np.float32(x.scale), np.float32, "s")
        zp = self._zero(x.dtype)
        q = b.op("QuantizeLinear", [name, s, zp], "q")
        enc = {"layer": label, "dtype": f"int{BITS[x.dtype]}", "bitwidth": BITS[x.dtype],
               "scale": [float(x.scale)], "offset": [0], "is_symmetric": True}
        if self.profile is not None:  # AIMET's symmetric uint8: x = (q + offset) * s
            enc.update(dtype="uint8", offset=[-UINT8_ZERO])
        self.activations[q] = enc
        return q, b.op("DequantizeLinear", [q, s, zp], "dq")

    def layer_output(self, q: str) -> tuple[str, int]:
        """The name and ONNX dtype of the per-layer output of the QuantizeLinear ``q``: itself,
        or (profile) its int32 value less the zero point, so verification compares integers."""
        if self.profile is None:
            return q, 0
        v = self.b.op("Sub", [self.b.cast(q, self.T.INT32),
                              self.b.const(UINT8_ZERO, np.int32, "zp")], "layer")
        return v, self.T.INT32

    def param(self, values: np.ndarray, scale: np.ndarray, dtype: str, label: str,
              axis: int = 0) -> str:
        """An integer initializer dequantized per channel along ``axis``."""
        b = self.b
        np_t = {"qint8": np.int8, "qint32": np.int32}[dtype]
        enc = {"layer": label, "dtype": f"int{BITS[dtype]}", "bitwidth": BITS[dtype],
               "axis": axis, "scale": [float(v) for v in scale],
               "offset": [0] * len(scale), "is_symmetric": True}
        zero = np.zeros(scale.shape, np_t)
        if self.profile is not None and dtype == "qint8":
            # uint8 weights with zero point 128 (the same values): onnxruntime's u8u8 kernels
            # are exact on every x86 CPU; its u8s8 ones on AVX2 without VNNI add pairs of
            # products in int16 with saturation (``vpmaddubsw``), so a u8s8 group there does
            # not compute the accumulator that qatkit (and the same kernel on VNNI) computes
            np_t = np.uint8
            values = (values.astype(np.int16) + UINT8_ZERO).astype(np.uint8)
            zero = np.full(scale.shape, UINT8_ZERO, np.uint8)
            enc.update(dtype="uint8", offset=[-UINT8_ZERO] * len(scale))
        q = b.const(values, np_t, f"{label}.{'weight' if dtype == 'qint8' else 'bias'}")
        s = b.const(scale.astype(np.float32), np.float32, "s")
        zp = b.const(zero, np_t, "zp")
        self.params[q] = enc
        return b.op("DequantizeLinear", [q, s, zp], "dq", axis=axis)

    # ---- the walk ------------------------------------------------------------------------
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
        if isinstance(out, QTensor) and out.axis is None:
            q, res = self.qdq(res, out, node.label)
            q, dtype = self.layer_output(q)
            self.layers[layer_key(node)] = q
            self.layer_shapes[q] = ["N", *out.q.shape[1:]] if out.q.dim() else []
            self.layer_types[q] = dtype or (self.T.INT8 if out.dtype == "qint8" else
                                            self.T.INT16)
        return res

    def module(self, node: tr.Node, mod: nn.Module, xs: list[Any], names: list[str]) -> str:
        b = self.b
        if isinstance(mod, QQuantStub):
            return names[0]
        x, name = (xs[0], names[0]) if xs else (None, "")
        if isinstance(mod, QDeQuantStub):
            return self._same(name)
        if not isinstance(x, QTensor):
            raise _refuse(node, "runs on float values; only the quantized region between "
                          "QuantStub and DeQuantStub is exported.")
        if x.axis is not None and not isinstance(mod, (nn.ReLU, nn.Identity, nn.Dropout)):
            raise _refuse(node, "receives a per-channel (high-precision) tensor.")
        if isinstance(mod, (QConv2d, QLinear, QConvTranspose2d)):
            return self.weighted(mod, x, name, node)
        if isinstance(mod, QLookupTable):
            return self.lut(mod.kind, name, node)
        if isinstance(mod, QClamp):
            lo, hi, _, _ = mod.params(x)
            s = float(x.scale)
            return b.op("Clip", [name, b.const(np.float32(lo * s), np.float32, "lo"),
                                 b.const(np.float32(hi * s), np.float32, "hi")])
        if isinstance(mod, QAvgPool2d):
            kernel, stride, padding, _, _ = mod.params(x)
            k, st, p = _pair(kernel), _pair(stride or kernel), _pair(padding)
            return b.op("AveragePool", [name], "avgpool", kernel_shape=k, strides=st,
                        pads=p * 2, count_include_pad=1)
        if isinstance(mod, QUpsampleBilinear):
            return self.bilinear_f(mod, x, name)
        if isinstance(mod, QPReLU):
            return self.prelu_f(mod, x, name)
        if isinstance(mod, QSoftmax):
            return b.op("Softmax", [name], "softmax", axis=mod.dim % x.q.dim())
        if isinstance(mod, QLayerNorm):
            return self.layer_norm_f(mod, x, name)
        if isinstance(mod, QAvgPool2dDivisor):
            return self.avg_pool_divisor_f(mod, name, node)
        if isinstance(mod, nn.ReLU):
            return b.op("Relu", [name])
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return self._same(name)
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise _refuse(node, "returns indices.")
            return self.maxpool_f(name, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                  mod.ceil_mode)
        if isinstance(mod, nn.Flatten):
            return self.reshape(name, self._shape(node, x))
        if isinstance(mod, nn.Upsample) and mod.mode == "nearest":
            return self.nearest(x, name, size=mod.size, scale_factor=mod.scale_factor,
                                recompute_scale_factor=mod.recompute_scale_factor)
        raise _refuse(node, "has no qdq ONNX form yet.")

    def weighted(self, mod: QConv2d | QLinear | QConvTranspose2d, x: QTensor, name: str,
                 node: tr.Node) -> str:
        b = self.b
        c = mod._prep(x)
        if c["q_b"] is None:  # QDQ holds an int32 bias at s_in * s_w only
            raise _refuse(node, "has a bias beyond int32 at the accumulator scale, which a QDQ "
                          "bias (int32 at s_in * s_w) cannot hold; the integer flavour "
                          "(flavour='integer') exports it exactly.")
        s_w = mod.weight_scale.numpy()
        if isinstance(mod, QConvTranspose2d):
            w = self.transposed_weight(mod, s_w, node.label)
        else:
            w = self.param(mod.weight.numpy(), s_w, "qint8", node.label)
        acc_s = fp.accumulator_scale(x.scale.detach(), mod.weight_scale).numpy()
        bias = self.param(c["q_b"].numpy().astype(np.int32), acc_s, "qint32", node.label)
        if isinstance(mod, QConv2d):
            attrs = {"strides": list(mod.stride), "dilations": list(mod.dilation),
                     "group": mod.groups, "pads": [mod.padding[0], mod.padding[1]] * 2}
            y = b.op("Conv", [name, w, bias], "conv", **attrs)
        elif isinstance(mod, QConvTranspose2d):
            attrs = {"strides": list(mod.stride), "dilations": list(mod.dilation),
                     "group": mod.groups, "pads": [mod.padding[0], mod.padding[1]] * 2,
                     "output_padding": list(mod.output_padding)}
            y = b.op("ConvTranspose", [name, w, bias], "convT", **attrs)
        elif x.q.dim() == 2:
            y = b.op("Gemm", [name, w, bias], "gemm", transB=1)
        elif self.profile is not None:
            raise _refuse(node, f"is a Linear on a {x.q.dim()}-d input: onnxruntime fuses "
                          "only the 2-d Gemm group (target profile 'onnxruntime').")
        else:
            y = b.op("Add", [b.op("MatMul", [name, b.op("Transpose", [w], perm=[1, 0])]), bias])
        if mod.output_mode != "quantized" or mod.activation is None:
            return y
        if self.profile is not None:
            # the fused group ends at a QuantizeLinear; the activation follows on the integers
            # (DequantizeLinear -> Relu/Clip -> QuantizeLinear reproduces them exactly)
            y = self.qdq(y, _like(mod, x), f"{node.label}.pre_activation")[1]
        if mod.activation == "relu":
            return b.op("Relu", [y])
        lo, hi = c["clamp"]
        s_o = float(mod.out_scale)
        return b.op("Clip", [y, b.const(np.float32(lo * s_o), np.float32, "lo"),
                             b.const(np.float32(hi * s_o), np.float32, "hi")])

    def transposed_weight(self, mod: QConvTranspose2d, s_w: np.ndarray, label: str) -> str:
        """The ``[Cin, Cout/g, kh, kw]`` weight of ConvTranspose: without groups the int8
        initializer in that layout, dequantized along axis 1 (the output channels); with
        groups dequantized output-channel first and rearranged in float (exact: a move)."""
        q_w = mod.weight  # [Cout, Cin/g, kh, kw]
        g, cout, cig, kh, kw = mod.groups, *q_w.shape
        if g == 1:
            return self.param(q_w.transpose(0, 1).contiguous().numpy(), s_w, "qint8", label,
                              axis=1)
        w = self.param(q_w.numpy(), s_w, "qint8", label)
        w = self.reshape(w, (g, cout // g, cig, kh, kw))
        w = self.b.op("Transpose", [w], perm=[0, 2, 1, 3, 4])
        return self.reshape(w, (g * cig, cout // g, kh, kw))

    def lut(self, kind: str, name: str, node: tr.Node) -> str:
        b = self.b
        if kind == "sigmoid":
            return b.op("Sigmoid", [name])
        if kind == "tanh":
            return b.op("Tanh", [name])
        if kind == "silu":
            return b.op("Mul", [name, b.op("Sigmoid", [name])], "silu")
        if kind == "hardswish":
            return b.op("HardSwish", [name])
        if kind == "hardsigmoid":
            return b.op("HardSigmoid", [name], alpha=1.0 / 6.0, beta=0.5)
        if kind in ("gelu", "gelu_tanh"):
            return self.gelu_f(kind, name)
        raise _refuse(node, f"is a lookup table of {kind!r}, which has no qdq ONNX form yet.")

    def gelu_f(self, kind: str, name: str) -> str:
        """``Gelu`` from opset 20; before it the standard decompositions ``0.5 * x * (1 +
        Erf(x / sqrt(2)))`` and ``0.5 * x * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))``."""
        b, f32 = self.b, np.float32
        if self.opset >= 20:
            return b.op("Gelu", [name], "gelu", approximate="tanh" if kind == "gelu_tanh"
                        else "none")
        if kind == "gelu":
            inner = b.op("Erf", [b.op("Mul", [name, b.const(f32(2**-0.5), f32, "c")])])
        else:
            cube = b.op("Mul", [b.op("Mul", [name, name]), name])
            t = b.op("Add", [name, b.op("Mul", [cube, b.const(f32(0.044715), f32, "c")])])
            inner = b.op("Tanh", [b.op("Mul", [t, b.const(f32(np.sqrt(2 / np.pi)), f32,
                                                          "c")])])
        one_plus = b.op("Add", [inner, b.const(f32(1.0), f32, "one")])
        half_x = b.op("Mul", [name, b.const(f32(0.5), f32, "half")])
        return b.op("Mul", [half_x, one_plus], "gelu")

    def prelu_f(self, mod: QPReLU, x: QTensor, name: str) -> str:
        """``LeakyRelu`` for one slope, ``PRelu`` with the slopes shaped ``[C, 1, ...]``."""
        slope = mod.slope.numpy().astype(np.float32)
        if slope.size == 1:
            return self.b.op("LeakyRelu", [name], "leaky_relu", alpha=float(slope[0]))
        shape = [slope.size] + [1] * (x.q.dim() - 2)
        return self.b.op("PRelu", [name, self.b.const(slope.reshape(shape), np.float32,
                                                      "slope")], "prelu")

    def layer_norm_f(self, mod: QLayerNorm, x: QTensor, name: str) -> str:
        """``LayerNormalization`` over the last dims; channels first (LayerNorm2d) between two
        ``Transpose`` that move axis 1 last and back."""
        b, nd = self.b, x.q.dim()
        shape = [x.q.shape[d] for d in mod._dims(nd)]
        w = np.ones(shape, np.float32) if mod.weight is None else mod.weight.numpy()
        bias = np.zeros(shape, np.float32) if mod.bias is None else mod.bias.numpy()
        scale, shift = (b.const(np.asarray(v, np.float32).reshape(shape), np.float32, hint)
                        for v, hint in ((w, "ln_w"), (bias, "ln_b")))
        if mod.channel_axis is None:
            return b.op("LayerNormalization", [name, scale, shift], "layer_norm",
                        axis=-len(shape), epsilon=mod.eps)
        ax = mod.channel_axis
        perm = [d for d in range(nd) if d != ax] + [ax]
        back = [perm.index(d) for d in range(nd)]
        t = b.op("Transpose", [name], perm=perm)
        t = b.op("LayerNormalization", [t, scale, shift], "layer_norm", axis=-1,
                 epsilon=mod.eps)
        return b.op("Transpose", [t], perm=back)

    def avg_pool_divisor_f(self, mod: QAvgPool2dDivisor, name: str, node: tr.Node) -> str:
        """``AveragePool`` with ``ceil_mode`` and ``count_include_pad``; ``divisor_override``
        (no ONNX attribute) as the full-window average times ``kh * kw / d``, which is the
        window sum over ``d`` only without ceil-mode windows (refused with them)."""
        b = self.b
        attrs = {"kernel_shape": list(mod.kernel), "strides": list(mod.stride),
                 "pads": list(mod.padding) * 2, "ceil_mode": int(mod.ceil_mode)}
        if mod.divisor_override is None:
            return b.op("AveragePool", [name], "avgpool",
                        count_include_pad=int(mod.count_include_pad), **attrs)
        if mod.ceil_mode:
            raise _refuse(node, "is an AvgPool2d with divisor_override and ceil_mode, which "
                          "has no standard ONNX form (AveragePool has no divisor).")
        avg = b.op("AveragePool", [name], "avgpool", count_include_pad=1, **attrs)
        k = mod.kernel[0] * mod.kernel[1] / mod.divisor_override
        return b.op("Mul", [avg, b.const(np.float32(k), np.float32, "k")], "divisor")

    def bilinear_f(self, mod: QUpsampleBilinear, x: QTensor, name: str) -> str:
        h, w = x.q.shape[-2:]
        (y0, _, _), (x0, _, _), _ = mod.params(x)
        oh, ow = len(y0), len(x0)
        sf = mod.scale_factor
        if sf is not None and not mod.recompute_scale_factor:
            sh, sw = (sf, sf) if not isinstance(sf, (tuple, list)) else sf
        else:
            sh, sw = oh / h, ow / w
        b = self.b
        scales = b.const([1.0, 1.0, sh, sw], np.float32, "scales")
        mode = "align_corners" if mod.align_corners else "pytorch_half_pixel"
        return b.op("Resize", [name, "", scales], "resize", mode="linear",
                    coordinate_transformation_mode=mode)

    def maxpool_f(self, name: str, kernel: Any, stride: Any, padding: Any, dilation: Any,
                  ceil_mode: bool) -> str:
        kernel = _pair(kernel)
        stride = _pair(stride) if stride not in (None, []) else kernel
        return self.b.op("MaxPool", [name], "maxpool", kernel_shape=kernel, strides=stride,
                         pads=_pair(padding) * 2, dilations=_pair(dilation),
                         ceil_mode=int(bool(ceil_mode)))

    def function(self, node: tr.Node, xs: list[Any], names: list[str]) -> str:
        op, x, name = node.op, xs[0], names[0]
        if isinstance(x, QTensor) and x.axis is not None:
            raise _refuse(node, "is applied to a per-channel (high-precision) tensor.")
        if op in RESHAPES or op in SPLITS or op in ("permute", "transpose", "t"):
            return super().function(node, xs, names)  # moves values: dtype-agnostic
        if not isinstance(x, QTensor):
            raise _refuse(node, "runs on float values; only the quantized region between "
                          "QuantStub and DeQuantStub is exported.")
        if op in ("relu", "relu_"):
            return self.b.op("Relu", [name])
        if op == "dropout":
            return self._same(name)
        if op in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
            import inspect

            import torch.nn.functional as F
            args, kwargs = node.arguments or ((), {})
            a = inspect.signature(F.max_pool2d).bind(*args, **kwargs).arguments
            if a.get("return_indices"):
                raise _refuse(node, "returns indices.")
            return self.maxpool_f(name, a["kernel_size"], a.get("stride"), a.get("padding", 0),
                                  a.get("dilation", 1), a.get("ceil_mode", False))
        if op == "interpolate":
            return super().function(node, xs, names)  # nearest: Gathers, dtype-agnostic
        raise _refuse(node, "has no qdq ONNX form yet.")

    def functional(self, mod: QFunctional, node: tr.Node, xs: list[QTensor], names: list[str]
                   ) -> str:
        b, op, args = self.b, node.op, node.arguments or {}
        f32 = np.float32
        if op in ("add", "add_relu", "sub"):
            y = b.op("Sub" if op == "sub" else "Add", names)
        elif op == "add_scalar":
            y = b.op("Add", [names[0], b.const(f32(args["c"]), f32, "c")])
        elif op == "mul":
            y = b.op("Mul", names)
        elif op == "mul_scalar":
            y = b.op("Mul", [names[0], b.const(f32(args["c"]), f32, "c")])
        elif op == "matmul":
            y = b.op("MatMul", names)
        elif op in ("sum", "mean"):
            dims = args["dim"] if isinstance(args["dim"], (tuple, list)) else [args["dim"]]
            keep = int(bool(args.get("keepdim", False)))
            if op == "sum" or self.opset >= 18:  # axes as an input (ReduceMean: opset 18)
                axes = b.const(list(dims), np.int64, "axes")
                y = b.op("ReduceSum" if op == "sum" else "ReduceMean", [names[0], axes],
                         keepdims=keep)
            else:
                y = b.op("ReduceMean", [names[0]], axes=list(dims), keepdims=keep)
        elif op in ("maximum", "minimum"):
            y = b.op("Max" if op == "maximum" else "Min", names)
        elif op in ("cat", "concat", "stack"):
            out_nd = len(node.shape or ())
            dim = args.get("dim", 0) % out_nd
            parts = names if op != "stack" else [
                b.op("Unsqueeze", [n, b.const([dim], np.int64, "axes")]) for n in names]
            y = b.op("Concat", parts, axis=dim)
        else:
            raise _refuse(node, "has no qdq ONNX form yet.")
        return b.op("Relu", [y]) if mod.relu_after(op) else y


UINT8_ZERO = 128  # the zero point of the profile's uint8 activations: q_u8 - 128 = q


def _like(mod: nn.Module, x: QTensor) -> QTensor:
    """A stand-in for a layer's output before its fused activation: its scale and dtype."""
    return QTensor(x.q[:0].to(torch.int8), mod.out_scale, mod.out_dtype)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def export_qdq(model: nn.Module, example_inputs: Any) -> tuple[Any, dict[str, Any]]:
    """The qdq ONNX ModelProto of a converted model and its encodings (module docstring)."""
    ex = QdqExporter(model, example_inputs)
    proto = ex.build()
    return proto, ex.encodings()


__all__ = ["QdqExporter", "export_qdq"]
