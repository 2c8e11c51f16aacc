"""Run an exported ONNX file in onnxruntime next to the fixed-point model, element by element.

For every model output: the fraction of identical elements, the largest difference in LSBs of
the output (integers for quantized tensors; ``|a - b| / s`` for dequantized outputs, ``s`` the
DeQuantStub's scale) and, for ``[N, C]`` outputs, the fraction of rows whose argmax agrees.
The integer flavour records every quantized layer as an extra int32 output (model property
``qatkit.layers``), so the same figures are given per layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.export.onnx_integer import layer_key
from qatkit.quantization import trace as tr


def session(model: Any) -> Any:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise fail("QK000", "verification needs the 'onnxruntime' package, which is not "
                   "installed.", 'pip install "qatkit[export]"') from None
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _row(name: str, got: np.ndarray, want: np.ndarray, lsb: Any = 1.0) -> dict[str, Any]:
    if got.shape != want.shape:
        return {"name": name, "identical": 0.0, "max_lsb": float("inf"), "agree": None,
                "shape": [list(got.shape), list(want.shape)]}
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) / lsb
    agree = None
    if want.ndim == 2 and want.shape[1] > 1:
        agree = float(np.mean(got.argmax(1) == want.argmax(1)))
    return {"name": name, "identical": float(np.mean(got == want)) if got.size else 1.0,
            "max_lsb": float(diff.max()) if diff.size else 0.0, "agree": agree}


def compare(onnx_model: Any, quantized_model: nn.Module, inputs: Any) -> dict[str, Any]:
    """onnxruntime vs qatkit on ``inputs``; returns ``{"outputs": [...], "layers": [...],
    "identical": bool}``."""
    sess = session(onnx_model)
    ins = inputs if isinstance(inputs, tuple) else (inputs,)
    feeds = {f"input_{i}": t.detach().numpy().astype(np.float32) for i, t in enumerate(ins)}
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feeds)))
    props = sess.get_modelmeta().custom_metadata_map
    layers = dict(kv.split("=", 1) for kv in props.get("qatkit.layers", "").split(",") if kv)
    outputs: list[Any] = []
    hook = quantized_model.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        g = tr.trace(quantized_model, ins)
    finally:
        hook.remove()
    flat: list[Any] = []
    tr._walk(outputs[-1], flat.append)
    scales = {id(n.output): n for n in g.nodes}
    rows = []
    for i, want in enumerate(flat):
        node = scales.get(id(want))
        src = node and [g.nodes[j].output for j in node.inputs if j >= 0]
        lsb: Any = 1.0
        if src and isinstance(src[0], QTensor):
            s = src[0].scale.to(torch.float64).numpy()
            lsb = s if s.ndim == 0 or src[0].axis is None else s.reshape(
                [-1 if d == src[0].axis else 1 for d in range(want.dim())])
        rows.append(_row(f"output_{i}", got[f"output_{i}"], want.detach().numpy(), lsb))
    layer_rows = []
    for node in g.nodes:
        name = layers.get(layer_key(node))
        if name is not None and isinstance(node.output, QTensor) and name in got:
            layer_rows.append(_row(layer_key(node), got[name], node.output.q.numpy()))
    identical = all(r["identical"] == 1.0 for r in rows + layer_rows)
    return {"outputs": rows, "layers": layer_rows, "identical": identical}
