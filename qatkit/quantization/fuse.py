"""Fusion: conv+bn(+relu/relu6), conv(+bn)+add(+relu), linear+relu, standalone bn.

Patterns are found by data flow in a real forward (``qatkit.quantization.trace``), so they are
found however
``forward`` is written: a conv is fused with a BN only when the BN is the only consumer of the
conv's output and both are called once. Fused modules keep the float function exactly (BN
folded with its running statistics); replaced BN/ReLU modules become ``nn.Identity``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from qatkit.base.modules import set_submodule
from qatkit.quantization import trace as tr
from qatkit.quantization.compat import from_torch_ao
from qatkit.quantization.fused import (
    FusedConv2d,
    FusedLinear,
    as_fused_conv,
    as_fused_linear,
    fold_bn,
)
from qatkit.quantization.stubs import FloatFunctional

_ACT = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _only_consumer(g: tr.Graph, node: tr.Node) -> tr.Node | None:
    users = g.consumers(node)
    if len(users) != 1 or node.is_output:
        return None
    u = users[0]
    if u.kind == "module" and len(g.calls(u.target)) == 1 and len(u.inputs) == 1:
        return u
    if u.kind == "functional":
        return u
    return None


def fuse(model: nn.Module, example_inputs: Any, inplace: bool = False, *,
         graph: tr.Graph | None = None) -> nn.Module:
    """Return the fused float model (a copy unless ``inplace``). ``graph``: a trace of this
    very ``model`` object made by the caller, with ``inplace=True`` (saves one forward; the
    doctor passes its own)."""
    if graph is not None and not inplace:
        raise ValueError("fuse(graph=...) needs inplace=True: the graph refers to the modules "
                         "of the model it traced")
    if not inplace:
        model = copy.deepcopy(model)
    model = from_torch_ao(model)
    if is_fused(model):
        return model
    g = graph if graph is not None else tr.trace(model, example_inputs)
    single = {n.target for n in g.nodes if n.kind == "module" and n.call == 0} - {
        n.target for n in g.nodes if n.kind == "module" and n.call > 0}
    done: set[str] = set()
    for node in g.nodes:
        if node.kind != "module" or node.target not in single or node.target in done:
            continue
        mod = node.module
        if isinstance(mod, nn.Conv2d) and type(mod) in (nn.Conv2d, FusedConv2d):
            fused, last = as_fused_conv(mod), node
            nxt = _only_consumer(g, last)
            if nxt is not None and type(nxt.module) is nn.BatchNorm2d and nxt.target in single:
                fused = fold_bn(mod, nxt.module)
                set_submodule(model, nxt.target, nn.Identity())
                done.add(nxt.target)
                last = nxt
            last = _fuse_tail(model, g, fused, last, single, done)
            set_submodule(model, node.target, fused)
        elif type(mod) is nn.BatchNorm2d:
            bn = fold_bn(None, mod)
            bn.user_type = "BatchNorm2d"  # messages name what the user wrote, not the 1x1 conv
            set_submodule(model, node.target, bn)
        elif type(mod) in (nn.Linear, FusedLinear):
            fused = as_fused_linear(mod)
            nxt = _only_consumer(g, node)
            if nxt is not None and type(nxt.module) is nn.ReLU and fused.activation is None:
                fused.activation = "relu"
                set_submodule(model, nxt.target, nn.Identity())
                done.add(nxt.target)
            set_submodule(model, node.target, fused)
        done.add(node.target)
    model.__dict__["_qatkit_fused"] = True
    return model


def is_fused(model: nn.Module) -> bool:
    """True for a model made by :func:`fuse` (or prepared, which fuses)."""
    return bool(model.__dict__.get("_qatkit_fused", False))


def _fuse_tail(model: nn.Module, g: tr.Graph, fused: FusedConv2d, last: tr.Node,
               single: set[str], done: set[str]) -> tr.Node:
    """Fold a following ReLU/ReLU6, or an add (+ReLU) of a FloatFunctional."""
    nxt = _only_consumer(g, last)
    if nxt is None or fused.activation is not None:
        return last
    if nxt.kind == "module" and type(nxt.module) in _ACT and nxt.target in single:
        fused.activation = _ACT[type(nxt.module)]
        set_submodule(model, nxt.target, nn.Identity())
        done.add(nxt.target)
        return nxt
    ff = nxt.module
    if (nxt.kind == "functional" and nxt.op == "add" and isinstance(ff, FloatFunctional)
            and len(g.calls(nxt.target)) == 1 and nxt.inputs and nxt.inputs[0] == last.index):
        fused.feeds_add = True
        after = _only_consumer(g, nxt)
        if after is not None and after.kind == "module" and type(after.module) is nn.ReLU \
                and after.target in single:
            ff.fused_activation = "relu"
            set_submodule(model, after.target, nn.Identity())
            done.add(after.target)
        return nxt
    return last
