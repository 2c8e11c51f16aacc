"""Fake quantization and its three states.

======================  ==========  =============  =================  ===========
state                   observers   fake quant     scales             model mode
======================  ==========  =============  =================  ===========
``CALIBRATION``         update      off            computed after     ``eval()``
``QAT``                 update      on             follow observers   ``train()``
``VALIDATION``          frozen      on             fixed              ``eval()``
======================  ==========  =============  =================  ===========

Weights are fake-quantized per output channel with the scale of the *current* weights, so the
scale convert computes from the final weights is the one the last QAT step used. Activation
scales that came from calibration stay fixed in QAT (the vendor's fixed-activation QAT); scales
that were never calibrated follow their observer.
"""

from __future__ import annotations

import enum

import torch
import torch.nn as nn

from qatkit import trace as _trace
from qatkit.errors import fail
from qatkit.observers import FixedScaleObserver, Observer
from qatkit.qconfig import QuantSpec
from qatkit.quant_math import fake_quantize, scale_from_amax
from qatkit.rules import qk004_multi_device_calibration as _qk004


class FakeQuantState(enum.Enum):
    CALIBRATION = "calibration"
    QAT = "qat"
    VALIDATION = "validation"


_MODE = {FakeQuantState.CALIBRATION: False, FakeQuantState.QAT: True,
         FakeQuantState.VALIDATION: False}


class FakeQuantize(nn.Module):
    """Observer + fake quant of one tensor (an activation, or a weight when ``is_weight``)."""

    def __init__(self, spec: QuantSpec, pow2: bool = False, is_weight: bool = False) -> None:
        super().__init__()
        if is_weight and (spec.observer != "minmax" or spec.fixed_scale is not None):
            raise fail("QK000", "weights are quantized per output channel from their own "
                       f"min/max; observer {spec.observer!r} is not available for weights.",
                       "use QuantSpec(per_channel=True) for weights")
        self.dtype, self.pow2, self.is_weight = spec.dtype, pow2, is_weight
        self.ch_axis = 0 if spec.per_channel else None
        self.observer: Observer = spec.make_observer()
        self.state = FakeQuantState.QAT
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))
        self._dirty = False
        if isinstance(self.observer, FixedScaleObserver):
            self.scale.fill_(float(scale_from_amax(torch.tensor(
                self.observer.fixed_scale * _half_range(self.dtype)), self.dtype, pow2)))
            self.initialized.fill_(1)

    @property
    def fixed(self) -> bool:
        return isinstance(self.observer, FixedScaleObserver)

    def extra_repr(self) -> str:
        obs = type(self.observer).__name__
        return f"dtype={self.dtype}, state={self.state.value}, observer={obs}"

    def update_scale(self) -> None:
        """Make ``scale`` from the observer (no-op for fixed scales)."""
        if self.fixed or not self.observer.seen:
            self._dirty = False
            return
        s = scale_from_amax(self.observer.amax(), self.dtype, self.pow2)
        if self.scale.shape != s.shape:
            self.scale = s.clone()
        else:
            self.scale.copy_(s)
        self.initialized.fill_(1)
        self._dirty = False

    def weight_scale(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().flatten(1).amax(1) if self.ch_axis == 0 else w.detach().abs().max()
        return scale_from_amax(amax, self.dtype, self.pow2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if _trace._active:  # a trace observes the model; it must not change it
            return fake_quantize(x, self.scale, self.dtype, self.ch_axis) \
                if bool(self.initialized) and st is not FakeQuantState.CALIBRATION else x
        if self.is_weight:  # weights: scale from the current weights, every step
            if st is FakeQuantState.CALIBRATION:
                return x
            s = self.weight_scale(x)
            if self.scale.shape != s.shape:
                self.scale = s.clone()
            else:
                self.scale.copy_(s)
            self.initialized.fill_(1)
            return fake_quantize(x, s, self.dtype, self.ch_axis)
        if self.training != _MODE[st]:
            raise _mode_error(st, self.training)
        if st is FakeQuantState.CALIBRATION:
            err = _qk004.forward_error(self)  # DataParallel replica, or several processes
            if err is not None:
                raise err
            self.observer(x)
            self._dirty = True
            self.calibrated.fill_(1)
            return x
        if st is FakeQuantState.QAT and not self.fixed and not bool(self.calibrated):
            self.observer(x)
            self.update_scale()
        elif self._dirty:
            self.update_scale()
        if not bool(self.initialized):
            raise fail("QK008", "a fake quant has no scale yet: it never saw data in "
                       "calibration or QAT.", "calibrate (or train in QAT state) before validation")
        return fake_quantize(x, self.scale, self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        if self._dirty:
            self.update_scale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "scale"
        if key in state_dict and state_dict[key].shape != self.scale.shape:
            self.scale = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._dirty = False


def _half_range(dtype: str) -> float:
    from qatkit.quant_math import qrange
    qmin, qmax = qrange(dtype)
    return (qmax - qmin) / 2


def _mode_error(state: FakeQuantState, training: bool) -> Exception:
    want = "train()" if _MODE[state] else "eval()"
    have = "train()" if training else "eval()"
    return fail("QK000", f"fake-quant state {state.name} needs the model in {want} mode but it is "
                f"in {have} mode" + (" (BN/dropout would change what calibration sees)"
                                     if state is FakeQuantState.CALIBRATION else "") + ".",
                f"call model.{want.rstrip('()')}() before qk.set_fake_quantize(model, "
                f"FakeQuantState.{state.name}) and keep it while running")


def fake_quants(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize)]


def prepared_fake_quants(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    """:func:`fake_quants`, refusing a model that was never prepared."""
    fqs = fake_quants(model)
    if not fqs:
        raise fail("QK000", "the model has no fake quants: it was not prepared.",
                   "call qk.prepare(model, example_inputs, qconfig=...) first")
    return fqs


def set_fake_quantize(model: nn.Module, state: FakeQuantState) -> nn.Module:
    """Put every fake quant of ``model`` in ``state``; the model must already be in the
    matching mode (``eval()`` for CALIBRATION/VALIDATION, ``train()`` for QAT)."""
    if not isinstance(state, FakeQuantState):
        raise fail("QK000", f"unknown fake-quant state {state!r}.",
                   "use qk.FakeQuantState.CALIBRATION, QAT or VALIDATION")
    passed = model
    if isinstance(model, nn.DataParallel):
        model = model.module
    inner = getattr(model, "module", model)
    fqs = prepared_fake_quants(inner)
    world = _qk004.world_size()
    synced = False
    if world > 1:  # merge the ranks' statistics first, so that the guards judge global ones
        from qatkit import distributed
        synced = distributed.on_set_state(inner, [fq for _, fq in fqs], state)
    from qatkit import guards
    guards.on_set_state(inner, state, wrapper=passed)  # QK004 refuses a DataParallel here
    if inner.training != _MODE[state]:
        raise _mode_error(state, inner.training)
    # world: accepted by the guards (or silenced), so calibration forwards may run in it
    for _, fq in fqs:
        if fq.state is FakeQuantState.CALIBRATION and state is not FakeQuantState.CALIBRATION \
                and not synced:  # synchronized: rank 0's scales were shared already
            fq.update_scale()
        fq.state = state
        fq._qatkit_calibration_world = world
    return model
