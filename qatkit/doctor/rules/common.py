"""Helpers shared by the rules: the deploy region, qconfigs, fake-quant owners and scales,
producer walks. Not a rule itself (not listed in ``RULE_MODULES``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from qatkit.doctor.rules import Context
from qatkit.quantization import meta
from qatkit.quantization import trace as tr
from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.registry import FUNCTIONS_ON_QUANTIZED, keeps_scale
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub


def region(ctx: Context) -> set[int]:
    """Indices of the graph nodes in the deploy region (computed once per context)."""
    if ctx.graph is None:
        return set()
    r = ctx.extra.get("_region")
    if r is None:
        r = ctx.extra["_region"] = tr.quantized_nodes(ctx.graph)
    return r


def owner_name(name: str) -> str:
    """``'layer1.conv.activation_post_process'`` -> ``'layer1.conv'``."""
    for suffix in (".activation_post_process", ".weight_fake_quant"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else ""


def effective_scale(fq: FakeQuantize, ctx: Context | None = None) -> torch.Tensor | None:
    """The scale convert would use now, without changing ``fq``: a calibration that has not
    been closed yet (``scale_pending``) has its scale only in the observer. Cached in ``ctx``
    because a histogram observer's threshold search is costly."""
    if fq.fixed:
        return fq.scale
    if not (fq.scale_pending and fq.observer.seen):
        return fq.scale if bool(fq.initialized) else None
    cache = ctx.extra.setdefault("_qk1_scales", {}) if ctx is not None else {}
    key = (id(fq), int(fq.observer.count))
    if key not in cache:
        cache[key] = fq.scale_for(fq.observer.amax())
    return cache[key]


def output_fake_quant(mod: nn.Module | None) -> FakeQuantize | None:
    app = getattr(mod, "activation_post_process", None)
    return app if isinstance(app, FakeQuantize) else None


def is_passthrough(node: tr.Node) -> bool:
    """Nodes that move integers without changing them (same scale in, same scale out)."""
    if node.kind == "function":
        return node.op in FUNCTIONS_ON_QUANTIZED
    if node.kind != "module" or node.module is None:
        return False
    mod = node.module
    if isinstance(mod, DeQuantStub):
        return False
    return keeps_scale(mod)


def producer_scale(ctx: Context, index: int, depth: int = 0) -> tuple[float, str] | None:
    """The scale of the value produced by node ``index`` and the module that sets it, found by
    walking back through scale-preserving ops; None when unknown or not an 8/16-bit output
    (high-precision accumulators, float values, uncalibrated fake quants)."""
    if index < 0 or depth > 64:
        return None
    g = ctx.graph
    node = g.nodes[index]
    if is_passthrough(node):
        first = next((i for i in node.inputs if i >= 0), -1)
        return producer_scale(ctx, first, depth + 1)
    if node.kind not in ("module", "functional") or node.module is None:
        return None
    mod = node.module
    fq = output_fake_quant(mod)
    if fq is not None:
        s = effective_scale(fq, ctx)
        return None if s is None or s.numel() != 1 else (float(s), node.target)
    out_scale = getattr(mod, "out_scale", None)  # converted (fixed-point) modules
    if isinstance(out_scale, torch.Tensor) and out_scale.numel() == 1 and \
            getattr(mod, "out_dtype", "qint32") != "qint32":
        return float(out_scale), node.target
    return None


def user_type(mod: nn.Module | None) -> str:
    """The class name the user wrote for ``mod``: a fused/QAT/fixed-point form is named after
    its float module (``FusedConv2d`` -> ``Conv2d``; a folded standalone BN -> ``BatchNorm2d``;
    ``QATOp(Sigmoid)`` -> ``Sigmoid``)."""
    if mod is None:
        return "op"
    inner = getattr(mod, "op", None)
    if isinstance(inner, nn.Module) and type(mod).__name__ == "QATOp":
        mod = inner
    recorded = getattr(mod, "user_type", None)
    if isinstance(recorded, str):
        return recorded
    name = type(mod).__name__
    for prefix in ("QATFused", "Fused", "QAT"):
        rest = name[len(prefix):]
        if name.startswith(prefix) and hasattr(nn, rest):
            return rest
    return name


def is_marker(mod: nn.Module) -> bool:
    """Stubs and FloatFunctionals (float, QAT or converted forms)."""
    from qatkit.fixed_point.modules import QDeQuantStub, QFunctional, QQuantStub
    return isinstance(mod, (QuantStub, DeQuantStub, FloatFunctional, QQuantStub, QDeQuantStub,
                            QFunctional))


def n_calls(g: tr.Graph, name: str) -> int:
    return len(g.calls(name))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt(x: Any) -> str:
    """Numbers for messages: short, scientific when tiny or huge."""
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3g}"
    return f"{x:.4g}"


def qconfigs(ctx: Context) -> dict[str, Any]:
    """The effective qconfig per module name: the one prepare used, else the model's
    ``qconfig`` attributes (float stage of the doctor)."""
    if ctx.qconfigs is not None:
        return ctx.qconfigs
    cached = ctx.extra.get("_qk_qconfigs")
    if cached is None:
        from qatkit.quantization.qconfig import QConfigMapping
        cached = ctx.extra["_qk_qconfigs"] = QConfigMapping().resolve(ctx.model)
    return cached


def sources(nodes: list[Any]) -> str:
    return ", ".join(dict.fromkeys(n.source for n in nodes if n.source))


def input_source(ctx: Context) -> str | None:
    facts = meta.get(ctx.model)
    return ctx.input_source or (facts.input_source if facts else None)


def recorded_march(ctx: Context) -> str | None:
    if ctx.extra.get("recorded_march"):
        return ctx.extra["recorded_march"]

    m = meta.get(ctx.model)
    return m.march if m is not None else None


def has_own_output(module: nn.Module | None) -> bool:
    """Modules that own one output observer/scale (float, QAT or fixed-point form):
    FloatFunctional, QuantStub, conv/linear, value-changing ops, standalone BN."""
    if module is None:
        return False
    from qatkit.fixed_point.modules import QDeQuantStub, QModule
    from qatkit.quantization import registry as ops
    from qatkit.quantization.qat import QATOp, _QATWeighted
    from qatkit.quantization.stubs import FloatFunctional, QuantStub
    if isinstance(module, QDeQuantStub):
        return False
    if isinstance(module, (FloatFunctional, QuantStub, QATOp, _QATWeighted, QModule,
                           nn.BatchNorm2d)):
        return True
    return ops.is_weighted(module) or ops.has_own_output(module)


def is_fixed_point(module: nn.Module | None) -> bool:
    """True for modules that can run in a converted model's deploy region."""
    from qatkit.fixed_point.modules import QDeQuantStub, QModule
    from qatkit.quantization import registry as ops
    if module is None:
        return True
    if isinstance(module, (QModule, QDeQuantStub)):
        return True
    return ops.keeps_scale(module) or not has_own_output(module)
