"""A data-flow trace of one real forward pass.

qatkit decides by data flow, not by names: fusion, high-precision outputs, the deploy region
(QuantStub ... DeQuantStub), shared modules and float tensors reaching quantized ops are all
read off a :class:`Graph` recorded while the model runs on example inputs, by the one recorder
of model execution (:class:`qatkit.base.recorder.Recorder`): leaf modules are recorded through
forward hooks, FloatFunctional methods report themselves, and every other
torch function or tensor method called at the top level is recorded through a
``TorchFunctionMode``. Because the model really runs, Python control flow is no obstacle.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from qatkit.base import recorder
from qatkit.base.frames import is_library_file, user_frame, where
from qatkit.quantization.registry import lookup
from qatkit.quantization.sites import ROUTABLE, site_of

# Shape-only functions: they move values without changing them.
SHAPE_OPS = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "__getitem__", "t", "unflatten", "view_as", "reshape_as", "expand", "expand_as",
})
_SKIP_FUNCS = frozenset({"size", "dim", "numel", "__get__", "__len__", "__repr__", "__format__",
                         "__bool__", "item", "tolist", "__iter__", "is_floating_point",
                         "__index__", "__int__", "__float__", "element_size", "stride",
                         "is_contiguous", "data_ptr", "type", "get_device", "__hash__"})


@dataclass
class Node:
    index: int
    kind: str  # "input" | "module" | "functional" | "function"
    target: str  # module qualified name, or function name
    op: str  # module class name, FloatFunctional method or function name
    module: nn.Module | None = None
    call: int = 0  # 0 for the first call of a module in this forward, 1 for the second...
    inputs: list[int] = field(default_factory=list)  # producer nodes; -1 = not a traced tensor
    # per input, which tensor of its producer's output (in _walk order: chunk's k-th part)
    picks: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    source: str = ""  # "file.py:line" of the call site in user code
    shape: tuple[int, ...] | None = None
    is_output: bool = False
    output: Any = None  # what the call returned (kept for exporters)
    arguments: Any = None  # (args, kwargs) of a "function" node; kwargs of a "functional"
    # a "function" node's call site: (owner's qualified name, code path, occurrence)
    site: tuple[str, str, int] | None = None

    @property
    def label(self) -> str:
        return self.target + (f"#{self.call}" if self.call else "")


@dataclass
class Graph:
    nodes: list[Node]
    names: dict[int, str]  # id(module) -> qualified name
    outputs: list[int] = field(default_factory=list)  # producer of each output tensor, in order

    def calls(self, name: str) -> list[Node]:
        return [n for n in self.nodes if n.kind in ("module", "functional") and n.target == name]

    def called_names(self) -> set[str]:
        return {n.target for n in self.nodes if n.kind in ("module", "functional")}

    def producers(self, node: Node) -> list[Node]:
        return [self.nodes[i] for i in node.inputs if i >= 0]

    def consumers(self, node: Node, through_shape_ops: bool = False) -> list[Node]:
        out: list[Node] = []
        for u in node.users:
            user = self.nodes[u]
            if through_shape_ops and user.kind == "function" and user.op in SHAPE_OPS:
                out.extend(self.consumers(user, True))
            else:
                out.append(user)
        return out


class _Tracer(recorder.Recorder):
    """The recorder that builds a :class:`Graph`: one node per call, edges by tensor identity."""

    def __init__(self, model: nn.Module, sites: bool = False) -> None:
        super().__init__(model)
        self.nodes: list[Node] = []
        self.producer: dict[int, int] = {}
        self.alive: list[Any] = []  # keep traced tensors alive so their ids stay unique
        self.sites = sites
        self.site_counts: dict[tuple[int, str], int] = {}
        self.position: dict[int, int] = {}  # id(tensor) -> its place in its producer's output

    def is_leaf(self, module: nn.Module) -> bool:
        # Finding call sites: a model's own childless module that is no operator qatkit knows
        # (a Swish written as x * torch.sigmoid(x)) is looked into, so its calls are sites.
        leaf = recorder.is_leaf(module)
        if self.sites and leaf and not getattr(module, "_qatkit_leaf", False) \
                and lookup(module) is None:
            home = getattr(sys.modules.get(type(module).__module__), "__file__", None)
            return is_library_file(home or "<")
        return leaf

    def torch_call(self, func: Any, args: tuple, kwargs: dict[str, Any], output: Any,
                   depth: int = 2) -> None:
        """Record a top-level torch call (from the trace's mode, or the call-site
        dispatcher's own run of a call on a QTensor); ``depth``: frames up to the caller."""
        name = getattr(func, "__name__", str(func))
        if self.depth == 0 and name not in _SKIP_FUNCS:
            site = self.site(depth) if self.sites and name in ROUTABLE else None
            hit: list[bool] = []
            _walk(output, lambda _: hit.append(True))
            if hit:
                self.add("function", name, name, None, (args, kwargs), output).site = site

    def alias(self, obj: Any, same_as: Any) -> None:
        """``obj`` now holds the value ``same_as`` holds (an in-place op on ``obj``)."""
        i = self.producer.get(id(same_as))
        if i is not None:
            self.producer[id(obj)] = i
            self.position[id(obj)] = self.position.get(id(same_as), 0)

    def site(self, depth: int) -> tuple[str, str, int] | None:
        """The call site of the torch call being recorded, numbered by occurrence."""
        s = site_of(depth + 1)
        if s is None:
            return None
        owner, path, _ = s
        k = self.site_counts.get((id(owner), path), 0)
        self.site_counts[(id(owner), path)] = k + 1
        return self.names.get(id(owner), "?"), path, k

    def _inputs(self, args: Any) -> list[int]:
        found: list[int] = []
        _walk(args, lambda t: found.append(self.producer.get(id(t), -1)))
        return found

    def add(self, kind: str, target: str, op: str, module: nn.Module | None, args: Any,
            out: Any, call: int = 0) -> Node:
        node = Node(len(self.nodes), kind, target, op, module, call, self._inputs(args),
                    source=where(user_frame(1)), output=out,
                    arguments=args if kind == "function" else None)
        _walk(args, lambda t: node.picks.append(self.position.get(id(t), 0)))
        for i in node.inputs:
            if i >= 0:
                self.nodes[i].users.append(node.index)
        self.nodes.append(node)

        count = [0]

        def mark(t: Any) -> None:
            self.producer[id(t)] = node.index
            self.position[id(t)], count[0] = count[0], count[0] + 1
            self.alive.append(t)
            if node.shape is None and hasattr(t, "shape"):
                node.shape = tuple(t.shape)

        _walk(out, mark)
        return node

    def end(self, call: recorder.Call) -> Any:
        if call.method is not None:  # a FloatFunctional/QFunctional method
            node = self.add("functional", call.name, call.method, call.module, call.args,
                            call.output, call.index)
            node.arguments = call.kwargs  # the method's non-tensor arguments, for exporters
            return None
        seen: set[int] = set()
        _walk(call.args, lambda t: seen.add(id(t)))
        # Identity-like modules (DeQuantStub, Identity, Dropout in eval) return their input
        # object; give their output its own identity so the data flow stays correct.
        out = _fresh(call.output, seen)
        self.add("module", call.name, type(call.module).__name__, call.module, call.args, out,
                 call.index)
        return out


def _walk(obj: Any, fn: Any) -> None:
    from qatkit.base.qtensor import QTensor
    if isinstance(obj, (torch.Tensor, QTensor)):
        fn(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _walk(o, fn)
    elif isinstance(obj, dict):
        for o in obj.values():
            _walk(o, fn)


def _fresh(obj: Any, seen: set[int]) -> Any:
    from qatkit.base.qtensor import QTensor
    if isinstance(obj, torch.Tensor) and id(obj) in seen:
        return obj.view_as(obj)
    if isinstance(obj, QTensor) and id(obj) in seen:
        return QTensor(obj.q, obj.scale, obj.dtype, obj.axis)
    if isinstance(obj, (list, tuple)) and any(id(o) in seen for o in obj):
        return type(obj)(_fresh(o, seen) for o in obj)
    return obj


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        from qatkit.base.qtensor import QTensor
        kwargs = kwargs or {}
        if args and isinstance(args[0], QTensor):  # also a tensor method (x.chunk) on one
            out = QTensor.__torch_function__(func, types, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.tracer.torch_call(func, args, kwargs, out, 2)
        return out


def is_leaf(module: nn.Module) -> bool:
    from qatkit.quantization.fake_quant import FakeQuantize
    return not isinstance(module, FakeQuantize) and recorder.is_leaf(module)


def trace(model: nn.Module, example_inputs: Any, *, sites: bool = False,
          training: bool = False) -> Graph:
    """Run ``model`` once on ``example_inputs`` (a tensor, tuple or dict) and record its data
    flow. The model's mode and parameters are left as they were; no gradient is recorded.
    ``sites``: record the call site of each torch call that could be an operator, and look
    into the model's own childless modules (``qatkit.quantization.call_sites``).
    ``training``: run in train() mode, to see what only training reaches (auxiliary heads);
    buffers (BN statistics, observers) and the random state are restored afterwards."""
    if training:
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            with torch.random.fork_rng(devices=[]):
                return _trace(model, example_inputs, sites, True)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in saved:
                        b.copy_(saved[n])
    return _trace(model, example_inputs, sites, False)


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of example inputs: a dict is keywords, a tuple the positional
    inputs, anything else the one input."""
    if isinstance(example_inputs, dict):
        return (), example_inputs
    return (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}


def _trace(model: nn.Module, example_inputs: Any, sites: bool, training: bool) -> Graph:
    tracer = _Tracer(model, sites)
    args, kwargs = split_inputs(example_inputs)
    for a in (args, kwargs):
        _walk(a, lambda x: tracer.add("input", "input", "input", None, (), x))
    modes = {m: m.training for m in model.modules()}
    for m in modes:  # in eval(), a trace moves no BN statistics or observers; set directly,
        m.training = training  # so a prepared model hears no change of mode
    try:
        with torch.no_grad(), tracer, _Mode(tracer):
            out = model(*args, **kwargs)
    finally:
        for m, was in modes.items():
            m.training = was
    outputs: list[int] = []
    _walk(out, lambda x: outputs.append(_mark_output(tracer, x)))
    return Graph(tracer.nodes, tracer.names, outputs)


def _mark_output(tracer: _Tracer, x: Any) -> int:
    i = tracer.producer.get(id(x), -1)
    if i >= 0:
        tracer.nodes[i].is_output = True
    return i


def quantized_nodes(g: Graph) -> set[int]:
    """Nodes whose output is a quantized value: reached from a QuantStub without passing a
    DeQuantStub (the deploy region)."""
    from qatkit.fixed_point.modules import QDeQuantStub, QQuantStub
    from qatkit.quantization.stubs import DeQuantStub, QuantStub
    out: set[int] = set()
    for n in g.nodes:
        if n.kind == "input":
            continue
        if isinstance(n.module, (QuantStub, QQuantStub)):
            out.add(n.index)
        elif isinstance(n.module, (DeQuantStub, QDeQuantStub)):
            continue
        elif any(i in out for i in n.inputs):
            out.add(n.index)
    return out


def float_nodes_before_quant(g: Graph) -> set[int]:
    """Nodes computed from data before any QuantStub sees it (pre-processing)."""
    from qatkit.fixed_point.modules import QQuantStub
    from qatkit.quantization.stubs import QuantStub
    pre: set[int] = set()
    for n in g.nodes:
        if n.kind == "input":
            pre.add(n.index)
        elif isinstance(n.module, (QuantStub, QQuantStub)):
            continue
        elif n.inputs and all(i in pre for i in n.inputs if i >= 0) and any(
                i >= 0 for i in n.inputs):
            pre.add(n.index)
    return pre
