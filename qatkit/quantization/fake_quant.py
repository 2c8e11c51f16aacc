"""Fake quantization and its three states.

======================  ==========  =============  =================  ===========
state                   observers   fake quant     scales             model mode
======================  ==========  =============  =================  ===========
``CALIBRATION``         update      off            computed after     ``eval()``
``QAT``                 update      on             follow observers   ``train()``
``VALIDATION``          frozen      on             fixed              ``eval()``
======================  ==========  =============  =================  ===========

``train()``/``eval()`` work as in PyTorch: what a fake quant does (:attr:`FakeQuantize.
active_state`) follows the module mode between the two training-time states. A model in QAT
state under ``model.eval()`` validates (VALIDATION: frozen scales, BN already folded or in eval);
``model.train()`` returns it to QAT; VALIDATION under ``train()`` is QAT. So a standard loop
(``model.train()`` each epoch, ``model.eval()`` for validation) needs no qatkit call between the
two. Only CALIBRATION is bound to ``eval()`` (dropout or a BN in train mode would change what the
observers see): a calibration forward in ``train()`` is refused with that explanation.

Weights are fake-quantized per output channel with the scale of the *current* weights, so the
scale convert computes from the final weights is the one the last QAT step used. Activation
scales that came from calibration stay fixed in QAT (the vendor's fixed-activation QAT); scales
that were never calibrated follow their observer.

Under ``torch.compile`` the QAT and VALIDATION forwards are one graph per model: the
``initialized``/``calibrated`` buffers (kept for ``state_dict``) are mirrored by Python flags
that change only at state transitions (a scale made, a calibration forward, a checkpoint loaded,
:func:`set_fake_quantize`), so no forward reads a buffer as a Python value while compiling; a
transition costs one recompile. Eager forwards read the buffers themselves, as before, so code
that fills them directly keeps working. QAT with activation scales that were never calibrated
runs the observer every step inside the graph (min/max and moving-average observers; the
histogram observers' bin growth and threshold search still break it); the first scales made
are one recompile.
"""

from __future__ import annotations

import enum

import torch
import torch.nn as nn

from qatkit.base import hooks, recorder
from qatkit.base.errors import fail
from qatkit.base.modules import unwrap, world_size
from qatkit.base.quant_math import fake_quantize, is_pow2, pow2_ceil, scale_from_amax
from qatkit.fixed_point.modules import QModule
from qatkit.quantization.observers import FixedScaleObserver, Observer
from qatkit.quantization.qconfig import QuantSpec


class FakeQuantState(enum.Enum):
    """What the fake quants of a model do: observe (CALIBRATION), observe and simulate (QAT),
    simulate with frozen scales (VALIDATION). See the table in this module's docstring."""

    CALIBRATION = "calibration"
    QAT = "qat"
    VALIDATION = "validation"


def active_state(state: FakeQuantState, training: bool) -> FakeQuantState:
    """What a fake quant in ``state`` does in ``train()`` (True) or ``eval()`` mode: QAT and
    VALIDATION follow the mode; CALIBRATION stays (and is refused in ``train()``)."""
    if state is FakeQuantState.CALIBRATION:
        return state
    return FakeQuantState.QAT if training else FakeQuantState.VALIDATION


class FakeQuantize(nn.Module):
    """Observer + fake quant of one tensor (an activation, or a weight when ``is_weight``)."""

    # defaults for objects pickled before the mirrors existed (load_state_dict syncs them)
    _is_initialized = False
    _is_calibrated = False

    def __init__(self, spec: QuantSpec, pow2: bool = False, is_weight: bool = False) -> None:
        super().__init__()
        if is_weight and (spec.observer != "minmax" or spec.fixed_scale is not None):
            raise fail("QK000", "weights are quantized per output channel from their own "
                       f"min/max; observer {spec.observer!r} is not available for weights.",
                       "use QuantSpec(per_channel=True) for weights")
        if is_weight and spec.dtype == "float16":
            raise fail("QK002", "float16 weights: GEMM weights stay integer on every march "
                       "(float16 runs only the non-GEMM operators of nash-p/nash-h).",
                       "use QuantSpec('qint8' or 'qint16', per_channel=True) for weights")
        self.dtype, self.pow2, self.is_weight = spec.dtype, pow2, is_weight
        self.pow2_scale = spec.pow2 and not pow2  # consistency level (pow2: the march's rule)
        self.ch_axis = 0 if spec.per_channel else None
        # float16: no scale, no statistics; its "observer" only says so to the guards (fixed)
        self.observer: Observer = FixedScaleObserver(None, "float16", 1.0) \
            if self.is_float16 else spec.make_observer()
        self.state = FakeQuantState.QAT
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))
        self.calibration_world = 1  # the torch.distributed world size the state was set in
        self._pending = False  # observer saw calibration data its scale does not hold yet
        # Python mirrors of the two flag buffers: what a compiled forward branches on
        self._is_initialized = False
        self._is_calibrated = False
        if self.is_float16:
            self.pow2_scale = False
            self._mark_initialized()
        elif isinstance(self.observer, FixedScaleObserver):
            if self.pow2_scale and not is_pow2(torch.tensor(self.observer.fixed_scale)):
                raise fail("QK000", f"fixed scale {self.observer.fixed_scale!r} is not a power "
                           "of two, which the consistency level (power-of-two scales) needs.",
                           "use a power-of-two fixed scale (e.g. 1/128), or consistency level 0")
            self.scale.fill_(float(self.scale_for(torch.tensor(
                self.observer.fixed_scale * _half_range(self.dtype)))))
            self._mark_initialized()

    def _mark_initialized(self) -> None:
        # written, never read, on the weights' path: the first QAT step is not a transition
        # that recompiles
        self.initialized.fill_(1)
        self._is_initialized = True

    def _sync_flags(self) -> None:
        """Read the flag buffers into their Python mirrors (outside a compiled region)."""
        self._is_initialized = bool(self.initialized)
        self._is_calibrated = bool(self.calibrated)

    def _flags(self) -> tuple[bool, bool]:
        """(initialized, calibrated): the mirrors while compiling, else the buffers (which
        code outside this class may have filled), refreshing the mirrors."""
        if not torch.compiler.is_compiling():
            self._sync_flags()
        return self._is_initialized, self._is_calibrated

    @property
    def scale_pending(self) -> bool:
        """True while the observer holds calibration statistics that ``scale`` does not
        reflect yet (:meth:`finish_calibration` makes the scale)."""
        return self._pending

    def finish_calibration(self) -> None:
        """Make ``scale`` from what the observer saw, if that is still pending."""
        if self._pending:
            self.update_scale()

    def mark_synchronized(self) -> None:
        """The scale was set from statistics merged elsewhere (several processes): nothing
        is pending any more."""
        self._pending = False
        self._sync_flags()  # the merge filled the flag buffers

    @property
    def is_float16(self) -> bool:
        """The op runs in float16 (docs/fixed-point.md section 19): its output is rounded to
        float16, it has no scale (``scale`` stays 1)."""
        return self.dtype == "float16"

    @property
    def fixed(self) -> bool:
        return isinstance(self.observer, FixedScaleObserver)

    @property
    def active_state(self) -> FakeQuantState:
        """The state this fake quant acts in now: :attr:`state` as the module mode makes it
        (QAT under ``eval()`` validates, VALIDATION under ``train()`` trains)."""
        return active_state(self.state, self.training)

    def extra_repr(self) -> str:
        obs = type(self.observer).__name__
        return f"dtype={self.dtype}, state={self.state.value}, observer={obs}"

    def update_scale(self) -> None:
        """Make ``scale`` from the observer (no-op for fixed scales)."""
        if self.is_float16 or self.fixed or not self.observer.seen:
            self._pending = False
            return
        s = self.scale_for(self.observer.amax())
        if self.scale.shape != s.shape:
            self.scale = s.clone()
        else:
            self.scale.copy_(s)
        self._mark_initialized()
        self._pending = False

    def weight_scale(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Per-channel scales from the weights' ranges. ``bias`` (convert passes it): a channel
        whose weights are all zero takes its range from its bias instead (spec section 5), so
        the bias stays representable at ``s_in * s_w``; its weights are 0 at any scale."""
        amax = w.detach().abs().flatten(1).amax(1) if self.ch_axis == 0 else w.detach().abs().max()
        if bias is not None and self.ch_axis == 0:
            amax = torch.where(amax == 0, bias.detach().abs().to(amax.dtype), amax)
        return self.scale_for(amax)

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale of a range ``amax`` under this fake quant's dtype and scale rule."""
        s = scale_from_amax(amax, self.dtype, self.pow2)
        return pow2_ceil(s) if self.pow2_scale else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            raise _low_precision_error(x.dtype)
        if self.is_float16:  # every state: the chip computes in float16
            return round_float16(x, self)
        st = active_state(self.state, self.training)
        if torch.compiler.is_exporting():
            return self._exported_forward(x)
        if recorder.active() is not None:  # a trace observes the model; it must not change it
            return fake_quantize(x, self.scale, self.dtype, self.ch_axis) \
                if self._flags()[0] and st is not FakeQuantState.CALIBRATION else x
        if self.is_weight:  # weights: scale from the current weights, every step
            if st is FakeQuantState.CALIBRATION:
                return x
            s = self.weight_scale(x)
            if self.scale.shape != s.shape:
                self.scale = s.clone()
            else:
                self.scale.copy_(s)
            self._mark_initialized()
            return fake_quantize(x, s, self.dtype, self.ch_axis)
        initialized, calibrated = self._flags()
        if st is FakeQuantState.CALIBRATION:
            if self.training:
                raise _mode_error(st, self.training)
            hooks.emit("calibration_forward", fake_quant=self)  # the doctor: QK004
            self.observer(x)
            self._pending = True
            self.calibrated.fill_(1)
            self._is_calibrated = True
            return x
        if st is FakeQuantState.QAT and not self.fixed and not calibrated:
            self.observer(x)
            self.update_scale()
        elif self._pending:
            self.update_scale()
        if not (initialized or self._is_initialized):  # update_scale may have set it now
            raise fail("QK008", "a fake quant has no scale yet: it never saw data in "
                       "calibration or QAT.", "calibrate (or train in QAT state) before validation")
        return fake_quantize(x, self.scale, self.dtype)

    def _exported_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The VALIDATION forward, as ``torch.export`` records it: no statistic is updated and
        no buffer read as a Python value (``initialized`` is the guards' job at convert)."""
        if active_state(self.state, self.training) is not FakeQuantState.VALIDATION:
            raise fail("QK000", f"torch.export of a fake quant in state {self.state.name}: "
                       "only the VALIDATION forward is a fixed function of its input.",
                       "call model.eval() before torch.export.export (QAT state validates "
                       "under eval())")
        if self.is_weight:
            return fake_quantize(x, self.weight_scale(x), self.dtype, self.ch_axis)
        return fake_quantize(x, self.scale, self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        if self._pending:
            self.update_scale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "scale"
        if key in state_dict and self.pow2_scale and not self.is_weight and \
                not is_pow2(state_dict[key]) and bool(state_dict.get(prefix + "initialized", 1)):
            raise fail("QK000", f"{prefix.rstrip('.') or 'a fake quant'}: the loaded scale "
                       f"{float(state_dict[key].reshape(-1)[0]):.6g} is not a power of two, "
                       "but this model was prepared at a consistency level that needs one.",
                       "calibrate (and train) at the same consistency level as this model")
        if key in state_dict and state_dict[key].shape != self.scale.shape:
            self.scale = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pending = False
        self._sync_flags()


_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _RoundFloat16(torch.autograd.Function):
    """float32 -> nearest float16 (ties to even) -> float32; straight-through gradient."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


def round_float16(x: torch.Tensor, fq: nn.Module | None = None) -> torch.Tensor:
    """A float16 op's output in QAT/calibration: ``x`` rounded once to float16 (float32 to
    float16 is one IEEE rounding in PyTorch). A value that rounds to inf, or a NaN, is refused
    (QK103), as the fixed-point model refuses it: never saturated."""
    y = _RoundFloat16.apply(x) if x.requires_grad else x.to(torch.float16).to(x.dtype)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(y).all()):
        from qatkit.fixed_point.float16 import overflow_error
        name = getattr(fq, "_qatkit_owner_name", "") if fq is not None else ""
        raise overflow_error(y, f"the operator {name!r}" if name else "an operator")
    return y


def _low_precision_error(dtype: torch.dtype) -> Exception:
    name = str(dtype).removeprefix("torch.")
    return fail("QK000", f"a fake quant received a {name} tensor (model.to({dtype}) or "
                "autocast on a prepared model). Fake quantization simulates the integer model "
                f"in float32: {name} holds too few significant bits for round(x / s) and q * s "
                "to be exact (int16 values, scales that are not powers of two), so QAT would "
                "train against a different model than the one convert builds.",
                "keep the prepared model in float32 (model.float()); train the float model in "
                f"{name} before qk.prepare if you need the speed")


def _half_range(dtype: str) -> float:
    from qatkit.base.quant_math import qrange
    qmin, qmax = qrange(dtype)
    return (qmax - qmin) / 2


def _mode_error(state: FakeQuantState, training: bool) -> Exception:
    # only CALIBRATION is bound to a mode; QAT and VALIDATION follow train()/eval()
    return fail("QK000", "fake-quant state CALIBRATION needs the model in eval() mode but it is "
                "in train() mode: dropout and BN in train mode would change what the observers "
                "see, so the scales would not fit the deployed (eval) model.",
                "call model.eval() for calibration (qk.calibrate does both); model.train() "
                "afterwards is QAT, model.eval() validation, no qatkit call needed")


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
    """Put every fake quant of ``model`` in ``state``. CALIBRATION needs ``eval()`` mode; QAT
    and VALIDATION take effect as the mode makes them (see :func:`active_state`): setting QAT
    in ``eval()`` validates until ``model.train()``."""
    if not isinstance(state, FakeQuantState):
        raise fail("QK000", f"unknown fake-quant state {state!r}.",
                   "use qk.FakeQuantState.CALIBRATION, QAT or VALIDATION")
    if not isinstance(model, nn.Module):
        raise fail("QK000", "qk.set_fake_quantize needs a torch.nn.Module, got "
                   f"{type(model).__name__}.", "pass the prepared model")
    inner = unwrap(model)
    if any(isinstance(m, QModule) for m in inner.modules()):
        raise fail("QK000", "qk.set_fake_quantize got a converted (fixed-point) model: it has "
                   "no fake quants, its scales are frozen integers.",
                   "use the prepared (calibrated/QAT) model it was converted from")
    fqs = prepared_fake_quants(inner)
    world = world_size()
    # Listeners: distributed calibration merges the ranks' statistics first (answering True
    # when it set the scales), then the doctor judges them (QK004 refuses a DataParallel).
    synced = any(hooks.emit("fake_quant_state", model=inner, fake_quants=[fq for _, fq in fqs],
                            state=state, wrapper=model))
    if state is FakeQuantState.CALIBRATION and inner.training:
        raise _mode_error(state, inner.training)
    # world: accepted by the guards (or silenced), so calibration forwards may run in it
    for _, fq in fqs:
        if fq.state is FakeQuantState.CALIBRATION and state is not FakeQuantState.CALIBRATION \
                and not synced:  # synchronized: rank 0's scales were shared already
            fq.update_scale()
        fq.state = state
        fq.calibration_world = world
        fq._sync_flags()  # a listener (distributed calibration) may have filled the buffers
    return model.module if isinstance(model, nn.DataParallel) else model
