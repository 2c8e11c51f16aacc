"""Helpers shared by rules QK001..QK009 (not a rule: it is not listed in ``RULE_MODULES``)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from qatkit.rules import Context


def qconfigs(ctx: Context) -> dict[str, Any]:
    """The effective qconfig per module name: the one prepare used, else the model's
    ``qconfig`` attributes (float stage of the doctor)."""
    if ctx.qconfigs is not None:
        return ctx.qconfigs
    cached = ctx.extra.get("_qk_qconfigs")
    if cached is None:
        from qatkit.qconfig import QConfigMapping
        cached = ctx.extra["_qk_qconfigs"] = QConfigMapping().resolve(ctx.model)
    return cached


def region(ctx: Context) -> set[int]:
    """Indices of the graph nodes in the deploy region (cached per graph)."""
    from qatkit import trace as tr
    key = ("_qk_region", id(ctx.graph))
    if key not in ctx.extra:
        ctx.extra[key] = tr.quantized_nodes(ctx.graph)
    return ctx.extra[key]


def owner_name(name: str) -> str:
    """The module that owns a fake quant: ``'c1.activation_post_process'`` -> ``'c1'``."""
    return name.rpartition(".")[0]


def sources(nodes: list[Any]) -> str:
    return ", ".join(dict.fromkeys(n.source for n in nodes if n.source))


def input_source(ctx: Context) -> str | None:
    return ctx.input_source or getattr(ctx.model, "_qatkit_input_source", None)


def recorded_march(ctx: Context) -> str | None:
    if ctx.extra.get("recorded_march"):
        return ctx.extra["recorded_march"]
    from qatkit import meta
    m = meta.get(ctx.model)
    return m.march if m is not None else None


def has_own_output(module: nn.Module | None) -> bool:
    """Modules that own one output observer/scale (float, QAT or fixed-point form):
    FloatFunctional, QuantStub, conv/linear, value-changing ops, standalone BN."""
    if module is None:
        return False
    from qatkit import ops
    from qatkit.qat import QATOp, _QATWeighted
    from qatkit.quantized import QDeQuantStub, QModule
    from qatkit.stubs import FloatFunctional, QuantStub
    if isinstance(module, QDeQuantStub):
        return False
    if isinstance(module, (FloatFunctional, QuantStub, QATOp, _QATWeighted, QModule,
                           nn.BatchNorm2d)):
        return True
    return type(module) in ops.WEIGHTED or ops.has_own_output(module)


def is_fixed_point(module: nn.Module | None) -> bool:
    """True for modules that can run in a converted model's deploy region."""
    from qatkit import ops
    from qatkit.quantized import QDeQuantStub, QModule
    if module is None:
        return True
    if isinstance(module, (QModule, QDeQuantStub)):
        return True
    return type(module) in ops.PASSTHROUGH or not has_own_output(module)
