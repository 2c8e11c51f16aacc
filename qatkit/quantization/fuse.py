"""Fusion: conv+bn(+relu/relu6), conv(+bn)+add(+relu), linear+relu, standalone bn.

Patterns are found by data flow in a real forward (``qatkit.quantization.trace``), so they are
found however ``forward`` is written: a conv is fused with a BN only when the BN is the only
consumer of the conv's output and both are called once. Fused modules keep the float function
exactly (BN folded with its running statistics); replaced BN/ReLU modules become
``nn.Identity``.

Data flow is followed through the modules that pass values unchanged: an ``nn.Identity`` (or
an empty ``nn.Sequential``) anywhere in a chain, and a ``Dropout`` (``nn.Dropout``,
``Dropout1d/2d/3d``) just before a ReLU only. Dropout multiplies by ``0`` or ``1/(1-p) > 0``,
so ``relu(dropout(y)) == dropout(relu(y))`` also in training; it does not commute with ReLU6's
clip at 6 or with a BN's shift, so it stops those fusions. The pass-through modules stay where
they are.

A conv (+BN) fuses into an add when its output is either operand of the add (``add(x, conv(x))``
as well as ``add(conv(x), x)``); when both operands are such convs, the first operand's conv is
fused (the other operand is requantized from its int8/int16 output as usual).
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
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# add ops a conv's int32 accumulator can feed directly (conv+add fusion): FloatFunctional's
# methods, and the operator forms of an op module recorded per call site
_ADD_OPS = frozenset({"add", "add_relu", "__add__", "__radd__", "__iadd__", "add_"})


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


def _is_pass(node: tr.Node) -> bool:
    """A module call that returns its one input unchanged in eval (Identity, an empty
    Sequential, Dropout). Such a module is never replaced, so it may be called at several
    places."""
    m = node.module
    return node.kind == "module" and len(node.inputs) == 1 and (
        type(m) is nn.Identity or type(m) in _DROPOUT
        or (type(m) is nn.Sequential and len(m) == 0))


def _next(g: tr.Graph, node: tr.Node) -> tr.Node | None:
    """The only consumer of ``node``'s output, through Identity and Dropout modules; ``None``
    when the value is used elsewhere too, or a Dropout is crossed towards anything but a
    ReLU module (see the module docstring)."""
    dropout = False
    while True:
        users = g.consumers(node)
        if len(users) != 1 or node.is_output:
            return None
        if not _is_pass(users[0]):
            break
        node = users[0]
        dropout = dropout or type(node.module) in _DROPOUT
    nxt = _only_consumer(g, node)
    if nxt is not None and dropout and not (nxt.kind == "module" and type(nxt.module) is nn.ReLU):
        return None
    return nxt


def _activation_after(g: tr.Graph, node: tr.Node, single: set[str], acts: tuple[type, ...]
                      ) -> tuple[tr.Node, str, bool] | None:
    """The ReLU (or a type in ``acts``) that alone consumes ``node``'s output (through
    pass-through modules): (its node, activation, whether it may be replaced by Identity).
    A module called once is replaced. A module called at several places (torchvision's
    BasicBlock calls one ``self.relu`` twice) or a functional ``F.relu``/``torch.relu`` is
    kept: fused into the producer it is applied twice, and a ReLU of non-negative values (or
    a ReLU6 of values already in [0, 6]) changes nothing, in QAT as on integers."""
    users = g.consumers(node)
    if len(users) != 1 or node.is_output:
        return None
    u, dropout = users[0], False
    while _is_pass(u):
        if len(g.consumers(u)) != 1 or u.is_output:
            return None
        dropout = dropout or type(u.module) in _DROPOUT
        u = g.consumers(u)[0]
    if u.kind == "module" and type(u.module) in acts and len(u.inputs) == 1 and not (
            dropout and type(u.module) is not nn.ReLU):  # dropout commutes with ReLU only
        return u, _ACT[type(u.module)], u.target in single
    if u.kind == "function" and u.op in ("relu", "relu_") and nn.ReLU in acts and \
            [i for i in u.inputs if i >= 0] == [node.index]:
        return u, "relu", False
    return None


def _is_add(g: tr.Graph, node: tr.Node) -> bool:
    """An add a conv's accumulator can feed: a recorded op module (a FloatFunctional, any
    subclass, or another module with a ``fused_activation``) adding two traced operands, the
    instance called once. A bare ``a + b`` outside any module has nothing to fuse into."""
    mod = node.module
    return (node.kind == "functional" and node.op in _ADD_OPS
            and (isinstance(mod, FloatFunctional) or hasattr(mod, "fused_activation"))
            and len(node.inputs) == 2 and len(g.calls(node.target)) == 1)


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
    # add node index -> (operand position, fused conv) of each conv chain ending in it
    adds: dict[int, list[tuple[int, FusedConv2d]]] = {}
    for node in g.nodes:
        if node.kind != "module" or node.target not in single or node.target in done:
            continue
        mod = node.module
        if isinstance(mod, nn.Conv2d) and type(mod) in (nn.Conv2d, FusedConv2d):
            fused, last = as_fused_conv(mod), node
            nxt = _next(g, last)
            if nxt is not None and type(nxt.module) is nn.BatchNorm2d and nxt.target in single:
                fused = fold_bn(mod, nxt.module)
                set_submodule(model, nxt.target, nn.Identity())
                done.add(nxt.target)
                last = nxt
            _fuse_tail(model, g, fused, last, single, done, adds)
            set_submodule(model, node.target, fused)
        elif type(mod) is nn.BatchNorm2d:
            bn = fold_bn(None, mod)
            bn.user_type = "BatchNorm2d"  # messages name what the user wrote, not the 1x1 conv
            act = _activation_after(g, node, single, tuple(_ACT))  # densenet's norm -> relu
            if act is not None:
                bn.activation = act[1]
                _replace(model, act, done)
            set_submodule(model, node.target, bn)
        elif type(mod) in (nn.Linear, FusedLinear):
            fused = as_fused_linear(mod)
            act = _activation_after(g, node, single, (nn.ReLU,))
            if act is not None and fused.activation is None:
                fused.activation = "relu"
                _replace(model, act, done)
            set_submodule(model, node.target, fused)
        done.add(node.target)
    for index, convs in adds.items():
        min(convs, key=lambda c: c[0])[1].feeds_add = True  # one accumulator per add
        _fuse_add_relu(model, g, g.nodes[index], single, done)
    model.__dict__["_qatkit_fused"] = True
    return model


def is_fused(model: nn.Module) -> bool:
    """True for a model made by :func:`fuse` (or prepared, which fuses)."""
    return bool(model.__dict__.get("_qatkit_fused", False))


def _fuse_tail(model: nn.Module, g: tr.Graph, fused: FusedConv2d, last: tr.Node,
               single: set[str], done: set[str], adds: dict[int, list[tuple[int, FusedConv2d]]]
               ) -> None:
    """Fold a following ReLU/ReLU6, or note the FloatFunctional add the conv's output is an
    operand of (in ``adds``; the caller picks one conv per add)."""
    if fused.activation is not None:
        return
    act = _activation_after(g, last, single, tuple(_ACT))
    if act is not None:
        fused.activation = act[1]
        _replace(model, act, done)
        return
    nxt = _next(g, last)
    if nxt is None:
        return
    if _is_add(g, nxt):
        # ``last`` is the chain's end; the add's operand is it or the Identity after it
        operand = next(i for i, p in enumerate(nxt.inputs) if _reaches(g, last, p))
        adds.setdefault(nxt.index, []).append((operand, fused))


def _reaches(g: tr.Graph, node: tr.Node, index: int) -> bool:
    """Whether node ``index`` is ``node`` or reached from it through pass-through modules."""
    while node.index != index:
        users = g.consumers(node)
        if len(users) != 1 or not _is_pass(users[0]):
            return False
        node = users[0]
    return True


def _fuse_add_relu(model: nn.Module, g: tr.Graph, add: tr.Node, single: set[str],
                   done: set[str]) -> None:
    """conv+add+relu: a ReLU module after the add is folded into the FloatFunctional."""
    ff = add.module
    if add.op == "add_relu" or getattr(ff, "fused_activation", None) is not None:
        return  # add_relu has its ReLU already
    act = _activation_after(g, add, single, (nn.ReLU,))
    if act is not None:
        ff.fused_activation = "relu"
        _replace(model, act, done)


def _replace(model: nn.Module, act: tuple[tr.Node, str, bool], done: set[str]) -> None:
    """A fused activation module called once becomes Identity; a shared or functional one
    stays (see :func:`_activation_after`)."""
    node, _, replace = act
    if replace:
        set_submodule(model, node.target, nn.Identity())
        done.add(node.target)
