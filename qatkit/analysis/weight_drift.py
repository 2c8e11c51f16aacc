"""Float vs QAT weights, per GEMM layer: how far QAT moved the weights, in their own units.

For each conv/linear layer of the prepared ``model`` and the same layer of the float model
(BN folded as prepare folds it, so the weights mean the same thing), with ``w_f`` the float
weights, ``w_q`` the prepared (QAT-trained) weights and ``s`` the per-channel weight scales of
``w_q``:

* ``change = ||w_q - w_f|| / ||w_f||`` (relative L2) and ``cosine(w_q, w_f)``;
* ``max_change_lsb = max |w_q - w_f| / s``: above 0.5 LSB QAT moved a weight across a rounding
  step;
* ``levels_changed``: the fraction of integer weights ``clamp(round(w / s))`` that differ
  between the float weights (at their own scales) and the QAT weights: what QAT changed in
  what the march runs;
* ``quant_sqnr_db``: SQNR of the quantized QAT weights against ``w_q`` (rounding alone);
* ``bias_change``: relative L2 change of the bias.

A calibrated model has the float weights: every change is 0 (and says that QAT did not run).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import _num, _sig, align_float, cosine, sqnr_db, stage
from qatkit.analysis.weight_ranges import _op, gemm_layers, oc_first
from qatkit.base.errors import fail
from qatkit.base.quant_math import qrange


@dataclass
class WeightDrift:
    name: str
    op: str
    weights: int
    change: float
    cosine: float
    max_abs_change: float
    max_change_lsb: float
    levels_changed: float
    quant_sqnr_db: float
    bias_change: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("change", "max_abs_change", "max_change_lsb", "levels_changed",
                  "bias_change"):
            d[k] = _sig(d[k], 6)
        d["cosine"] = _num(self.cosine, 8)
        d["quant_sqnr_db"] = _num(self.quant_sqnr_db, 2)
        return d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    n = float(b.norm())
    d = float((a - b).norm())
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)


def weight_drift(model_float: nn.Module, model: nn.Module, example_inputs: Any
                 ) -> list[WeightDrift]:
    """One :class:`WeightDrift` per GEMM layer of the prepared ``model`` against
    ``model_float`` (see the module docstring); layers without a float counterpart of the
    same shape are left out."""
    from qatkit.quantization.qat import _QATWeighted
    if stage(model_float) != "float" or stage(model) in ("float", "converted"):
        raise fail("QK000", "weight_drift compares the float model with its prepared "
                   "(calibrated or QAT) model.", "weight_drift(float_model, qat_model, x[:2])")
    ref = align_float(model_float, model, example_inputs)
    by_name = dict(ref.named_modules())
    out = []
    for name, mod in gemm_layers(model):
        f = by_name.get(name)
        if not isinstance(mod, _QATWeighted) or f is None or not hasattr(f, "weight"):
            continue
        wq, wf = oc_first(mod).to(torch.float64), oc_first(f).to(torch.float64)
        if wq.shape != wf.shape:
            continue
        fq = mod.weight_fake_quant
        bq = mod.bias.detach().to(torch.float64) if mod.bias is not None else None
        bf = getattr(f, "bias", None)
        bf = bf.detach().to(torch.float64) if bf is not None else None
        shape = (-1, *([1] * (wq.dim() - 1)))
        sq = fq.weight_scale(wq, bq).to(torch.float64).reshape(shape)
        sf = fq.weight_scale(wf, bf).to(torch.float64).reshape(shape)
        qmin, qmax = qrange(fq.dtype)
        lq = torch.clamp(torch.round(wq / sq), qmin, qmax)
        lf = torch.clamp(torch.round(wf / sf), qmin, qmax)
        diff = (wq - wf).abs()
        out.append(WeightDrift(
            name, _op(mod), wq.numel(), _rel(wq, wf),
            cosine(wq.reshape(-1), wf.reshape(-1)), float(diff.max()),
            float((diff / sq).max()), float((lq != lf).to(torch.float64).mean()),
            sqnr_db(wq.reshape(-1), (lq * sq).reshape(-1)),
            _rel(bq, bf) if bq is not None and bf is not None and bq.shape == bf.shape
            else None))
    return out


__all__ = ["WeightDrift", "weight_drift"]
