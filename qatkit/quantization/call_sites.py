"""Functional calls become operators: one generated module per call site.

Real models compute in ``forward`` with torch calls: ``out += identity`` (resnet),
``torch.cat`` (densenet, squeezenet), ``F.adaptive_avg_pool2d`` and ``x.mean([2, 3])``
(mobilenet, mnasnet), ``scale * x`` (squeeze-excitation). In the fixed-point model every
value-changing op needs its own calibrated output scale, so ``prepare`` gives each such call
in the quantized region its own operator module, as a FloatFunctional does for users who write
one. One site, one module, one distribution: rule QK007 holds by construction.

A call site (``qatkit.quantization.sites``) is the owner module, the code path from the owner's
frame to the call, and the occurrence in one forward of the model (a loop, a block called
twice: each occurrence is its own operator). The modules live under the root's ``qatkit_ops``
child, at the owner's path: the ``+=`` of ``layer1.0`` is ``qatkit_ops.layer1.0.add_0``. They
show in ``named_modules()`` and the state_dict, and prepare makes the same ones again from the
same float model (which is how checkpoints load).

At run time a ``TorchFunctionMode`` (entered by a forward pre-hook of the root, left by its
forward hook) routes each call at a known site to its module: the QAT module fake-quantizes the
result; after convert, the fixed-point module computes it on integers. Calls at other sites run
as they are: scale-keeping ones (reshapes, ReLU, max pooling...) are exact on integers, and any
other call on quantized values is refused with its file and line (QK102). Because the model
really runs, Python control flow keeps working.

Models without stubs: when the model has no QuantStub, the quantized region runs from its
inputs to its outputs: each floating-point tensor input passes a generated QuantStub
(``qatkit_ops.input_0``, ...), each output tensor a DeQuantStub (``qatkit_ops.output_0``, ...),
so outputs leave in high precision. Integer and non-tensor inputs stay as they are.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from qatkit.base import recorder
from qatkit.base.errors import fail
from qatkit.base.march import get_march
from qatkit.base.qtensor import QTensor
from qatkit.quantization import trace as tr
from qatkit.quantization.registry import BY_FUNCTION, Op
from qatkit.quantization.sites import ROUTABLE, site_of
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub

OPS_NAME = "qatkit_ops"
_log = logging.getLogger("qatkit")


class _Group(nn.Module):
    """Holds the operators of one module path (not called)."""


class CallSiteOps(nn.Module):
    """The generated operators of a model, by the path of their owner module.

    ``sites``: ``"owner|code path|occurrence"`` -> (operator path below this module, the
    FloatFunctional method it runs or None for a module, the call's non-tensor arguments).
    ``constants``: the same key -> (operand position, QuantStub path) for an operand that is
    no value of the region but a parameter or buffer (convnext's ``layer_scale * x``): it is
    quantized by its own QuantStub, as a second input of the region would be.
    ``auto_stubs``: the model had no QuantStub; ``input_*``/``output_*`` are its region's
    entry and exit."""

    def __init__(self, auto_stubs: bool) -> None:
        super().__init__()
        self.auto_stubs = auto_stubs
        self.sites: dict[str, tuple[str, str | None, str]] = {}
        self.constants: dict[str, tuple[int, str]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Called only by containers that run every child (a top-level nn.Sequential): the
        # identity, invisible to hooks, so the data flow is the model's own.
        if len(args) == 1 and not kwargs:
            return args[0]
        raise fail("QK000", "qatkit_ops holds the operators prepare generated for torch calls "
                   "in forward; it is not called.", "call the model")

    def place(self, owner: str, kind: str, module: nn.Module) -> str:
        """Register ``module`` as the next ``kind`` operator of ``owner``; its path here."""
        group: nn.Module = self
        for part in owner.split(".") if owner else []:
            nxt = group._modules.get(part)
            if nxt is None:
                nxt = _Group()
                group.add_module(part, nxt)
            group = nxt
        k = 0
        while f"{kind}_{k}" in group._modules:
            k += 1
        group.add_module(f"{kind}_{k}", module)
        module._qatkit_owner = owner  # its qconfig is the owner's (QConfigMapping.resolve)
        return ".".join([*(owner.split(".") if owner else []), f"{kind}_{k}"])


# ---- reading a torch call ------------------------------------------------------------------

def _is_value(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, QTensor))


def _signature(args: tuple, kwargs: dict) -> str:
    """The non-tensor arguments of a call (tensors by position only), to tell calls apart."""
    def show(v: Any) -> str:
        if _is_value(v):
            return "T"
        if isinstance(v, (list, tuple)):
            return "(" + ",".join(show(x) for x in v) + ")"
        return repr(v)
    return show(args) + show(tuple(sorted(kwargs.items())))


def _binary(row: Op, name: str, args: tuple, kwargs: dict) -> tuple[str, tuple] | str:
    """FloatFunctional method and operands of ``x op y`` / ``x op scalar``, or why none."""
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None:
        return f"{name} with alpha/rounding_mode"
    if not _is_value(a):  # torch.add(3, x)
        a, b = b, a
    reverse = name in ("__rsub__", "rsub")
    tensor = _is_value(b)
    if not tensor and not isinstance(b, (int, float)):
        return f"{name} with a {type(b).__name__} operand"
    kind = row.kind
    if kind == "add":
        return ("add", (a, b)) if tensor else ("add_scalar", (a, float(b)))
    if kind == "sub":
        if reverse:
            return ("sub", (b, a)) if tensor else "a scalar minus a tensor"
        return ("sub", (a, b)) if tensor else ("add_scalar", (a, -float(b)))
    if kind == "mul":
        return ("mul", (a, b)) if tensor else ("mul_scalar", (a, float(b)))
    if kind == "mul_scalar":  # division
        if tensor or b == 0:
            return "a division by a tensor" if tensor else "a division by zero"
        return "mul_scalar", (a, 1.0 / float(b))
    if not tensor:
        return f"{name} with a scalar operand"
    return kind, (a, b)  # matmul, maximum, minimum


def _method_call(row: Op, name: str, args: tuple, kwargs: dict
                 ) -> tuple[str, tuple, dict] | str:
    """(FloatFunctional method, positional operands, keywords) of a torch call, or why not."""
    if row.call == "binary":
        got = _binary(row, name, args, kwargs)
        return got if isinstance(got, str) else (got[0], got[1], {})
    if row.call == "list":
        xs = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return row.kind, (list(xs),), {"dim": dim}
    x = args[0] if args else kwargs.get("input")  # reduce
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if kwargs.get("dtype") is not None:
        return f"{name} with dtype="
    if dim is None:
        dim = tuple(range(x.dim()))
    return row.kind, (x, dim), {"keepdim": bool(keepdim)}


def _inplace(name: str) -> bool:
    return name.endswith("_") and not name.startswith("__")


# ---- run time ------------------------------------------------------------------------------

class _Dispatch(TorchFunctionMode):
    """Routes the torch calls at known sites of one model forward to their operators."""

    def __init__(self, ops: CallSiteOps) -> None:
        super().__init__()
        self.ops = ops
        self.counts: dict[tuple[str, str], int] = {}
        self.modules: dict[str, nn.Module] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in ROUTABLE:
            site = site_of(1)
            if site is not None:
                path = site[0].__dict__.get("_qatkit_path")
                if path is not None:
                    key = (path, site[1])
                    k = self.counts.get(key, 0)
                    self.counts[key] = k + 1
                    key = f"{path}|{site[1]}|{k}"
                    entry = self.ops.sites.get(key)
                    if entry is not None:
                        return self.run(entry, name, args, kwargs, site[2],
                                        self.ops.constants.get(key))
        if args and isinstance(args[0], QTensor):  # a tensor method on a QTensor (x.chunk:
            # a descriptor no mode below could call), reported to a trace
            out = QTensor.__torch_function__(func, types, args, kwargs)
            rec = recorder.active()
            if rec is not None:
                rec.torch_call(func, args, kwargs, out)
            return out
        return func(*args, **kwargs)

    def _module(self, path: str) -> nn.Module:
        op = self.modules.get(path)
        if op is None:
            op = self.modules[path] = self.ops.get_submodule(path)
        return op

    def run(self, entry: tuple[str, str | None, str], name: str, args: tuple, kwargs: dict,
            augmented: bool, constant: tuple[int, str] | None = None) -> Any:
        path, method, signature = entry
        op = self._module(path)
        if method is None:  # a module: the call's other arguments were fixed at prepare
            if _signature(args[1:], kwargs) != signature:
                raise _changed(path, name, signature, _signature(args[1:], kwargs))
            out = op(args[0] if args else kwargs["input"])
        else:
            got = _method_call(BY_FUNCTION[name], name, args, kwargs)
            if isinstance(got, str) or got[0] != method:
                raise _changed(path, name, method, got if isinstance(got, str) else got[0])
            operands = got[1]
            if constant is not None:  # the parameter operand, through its own QuantStub
                i, stub = constant
                operands = (*operands[:i], self._module(stub)(operands[i]), *operands[i + 1:])
            out = getattr(op, method)(*operands, **got[2])
        if _inplace(name) and not augmented:  # x.add_(y): the caller keeps using x itself
            target = args[0]
            if isinstance(target, QTensor) and isinstance(out, QTensor):
                target.q, target.scale, target.dtype, target.axis = \
                    out.q, out.scale, out.dtype, out.axis
            else:
                with recorder.inside_leaf():
                    target.copy_(out)
            rec = recorder.active()
            if rec is not None:
                rec.alias(target, out)
            return target
        return out  # x += y binds the result to x


def _changed(path: str, name: str, was: str, now: str) -> Exception:
    return fail("QK000", f"the call {name}() routed to operator {OPS_NAME}.{path} was made with "
                f"other arguments than at prepare ({was} then, {now} now); its operator was "
                "built for the first form.",
                "keep the call's non-tensor arguments fixed (e.g. a constant pooling size), or "
                "use a module for the op")


_active = threading.local()


def _enter(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    ops = model._modules.get(OPS_NAME)
    if not isinstance(ops, CallSiteOps):
        return None
    if ops.auto_stubs:
        stubs = ops._modules
        args = tuple(stubs[f"input_{i}"](a) if f"input_{i}" in stubs and _float(a) else a
                     for i, a in enumerate(args))
        kwargs = {k: stubs[f"input_{k}"](v) if f"input_{k}" in stubs and _float(v) else v
                  for k, v in kwargs.items()}
    mode = _Dispatch(ops)
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    stack.append(mode)
    mode.__enter__()
    return args, kwargs


def _leave(model: nn.Module, args: tuple, output: Any) -> Any:
    ops = model._modules.get(OPS_NAME)
    stack = getattr(_active, "stack", None)
    if stack:
        stack.pop().__exit__(None, None, None)
    if not isinstance(ops, CallSiteOps) or not ops.auto_stubs or output is None:
        return None
    count = [0]

    def dequant(x: Any) -> Any:
        i, count[0] = count[0], count[0] + 1
        stub = ops._modules.get(f"output_{i}")
        return stub(x) if stub is not None else x
    return _map(output, dequant)


def _float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _map(obj: Any, fn: Any) -> Any:
    """``obj`` with each tensor (or QTensor) replaced by ``fn(tensor)``, structure kept."""
    if _is_value(obj):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_map(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map(v, fn)) for k, v in obj.items())
    return obj


def _hook(model: nn.Module) -> list[Any]:
    return [model.register_forward_pre_hook(_enter, with_kwargs=True),
            model.register_forward_hook(_leave, always_call=True)]


# ---- prepare time --------------------------------------------------------------------------

def install(model: nn.Module, example_inputs: Any) -> CallSiteOps | None:
    """Give every value-changing torch call in ``model``'s quantized region its own operator
    (and, without QuantStubs, stubs at its inputs and outputs). Returns the operators' holder,
    or None when the model needs none. Idempotent: a model that has them is left as it is."""
    if isinstance(model._modules.get(OPS_NAME), CallSiteOps):
        return model._modules[OPS_NAME]  # type: ignore[return-value]
    auto = not any(isinstance(m, QuantStub) for m in model.modules())
    ops = CallSiteOps(auto)
    model.add_module(OPS_NAME, ops)
    handles: list[Any] = []
    try:
        if auto:
            args, kwargs = tr.split_inputs(example_inputs)
            for key, value in [*enumerate(args), *kwargs.items()]:
                if _float(value):
                    ops.add_module(f"input_{key}", QuantStub())
            handles = _hook(model)
        return _install(model, ops, example_inputs, handles)
    except BaseException:  # the model as it was: the caller reports the forward's failure
        for h in handles:
            h.remove()
        del model._modules[OPS_NAME]
        for m in model.modules():
            m.__dict__.pop("_qatkit_path", None)
        raise


def _install(model: nn.Module, ops: CallSiteOps, example_inputs: Any, handles: list[Any]
             ) -> CallSiteOps | None:
    auto = ops.auto_stubs
    g = tr.trace(model, example_inputs, sites=True)
    if auto:
        for j in range(len(g.outputs)):
            ops.add_module(f"output_{j}", DeQuantStub())
    region = tr.quantized_nodes(g)
    march = get_march()
    int16 = march is not None and "qint16" in march.activation_dtypes
    for node in g.nodes:
        if node.kind != "function" or node.site is None or node.index not in region:
            continue
        made = _operator(BY_FUNCTION[node.op], node)
        if made is None:
            continue
        owner_name, path, k = node.site
        module, method, signature, operands = made
        model.get_submodule(owner_name)._qatkit_path = owner_name
        label = BY_FUNCTION[node.op].kind if method is None else method
        where = ops.place(owner_name, label, module)
        key = f"{owner_name}|{path}|{k}"
        ops.sites[key] = (where, method, signature)
        i = _constant_operand(node, region, method, operands)
        if i is not None:  # int16 where the march has it: a learned per-channel factor
            stub = QuantStub(dtype="qint16" if int16 else "qint8")
            ops.constants[key] = (i, ops.place(owner_name, f"{label}_constant", stub))
    if not ops.sites and not auto:
        del model._modules[OPS_NAME]
        return None
    if not auto:
        handles.extend(_hook(model))
    if auto:
        n_in = sum(1 for k in ops._modules if k.startswith("input_"))
        _log.info("the model has no QuantStub: qatkit quantizes it from its %d input(s) to its "
                  "%d output(s), which leave in high precision (place QuantStub/DeQuantStub "
                  "to choose the region yourself)", n_in, len(g.outputs))
    return ops


def _constant_operand(node: tr.Node, region: set[int], method: str | None,
                      operands: tuple) -> int | None:
    """Position (among the method's operands) of a two-tensor op's operand that is not a
    value of the region (a parameter, a buffer), or None."""
    if method not in _TWO_TENSOR:
        return None
    args, kwargs = node.arguments
    tensors: list[Any] = []
    tr._walk((args, kwargs), tensors.append)
    producer = {id(t): p for t, p in zip(tensors, node.inputs, strict=False)}
    outside = [i for i, o in enumerate(operands[:2])
               if _is_value(o) and producer.get(id(o), -1) not in region]
    return outside[0] if len(outside) == 1 else None


_TWO_TENSOR = frozenset({"add", "sub", "mul", "maximum", "minimum"})


def _operator(row: Op, node: tr.Node) -> tuple[nn.Module, str | None, str, tuple] | None:
    """The operator module for one traced call, the FloatFunctional method it runs (None for
    a module), the call's non-tensor arguments and the method's operands (None: the call
    keeps its input scale)."""
    args, kwargs = node.arguments
    if row.call == "module":
        assert row.from_call is not None
        module = row.from_call(args, kwargs)
        if module is None:
            return None
        return module, None, _signature(args[1:], kwargs), ()
    got = _method_call(row, node.op, args, kwargs)
    if isinstance(got, str):
        raise fail("QK102", f"{node.op}() at {node.source} computes {got} on quantized values; "
                   "it has no fixed-point operator.",
                   "rewrite it with a supported form (x * (1 / c), y - x with both tensors), "
                   "or move it after the DeQuantStub")
    return FloatFunctional(), got[0], "", got[1]


def operators(model: nn.Module) -> dict[str, nn.Module]:
    """The generated operators of a prepared or converted model, by qualified name."""
    ops = model._modules.get(OPS_NAME)
    if not isinstance(ops, CallSiteOps):
        return {}
    return {f"{OPS_NAME}.{path}": ops.get_submodule(path) for path, _, _ in ops.sites.values()}


__all__ = ["OPS_NAME", "CallSiteOps", "install", "operators"]
