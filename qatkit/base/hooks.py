"""Named moments of the workflow, announced by the workflow and heard by its listeners.

The workflow (``qatkit.quantization``) never imports the doctor or the distributed code; it
announces what happens — ``emit("prepared", ...)`` — and whoever listens acts: the doctor's
guards run the rules of that stage (and raise on an error), distributed calibration merges
statistics across ranks. A listener may answer; :func:`emit` returns the answers that are not
``None``, in listener order.

The moments (keyword payloads):

=========================  ======================================================================
``prepare``                model, march, graph, example_inputs, qconfigs, processor, input_source,
                           history — before any module is swapped (the doctor's prepare stage)
``prepared``               model, graph — the prepared model is complete
``calibration_start``      model, data, synchronize — ``qk.calibrate`` begins
``calibration_batches``    model, batches — answer: the batch count of all ranks
``calibration_stop``       model — ``qk.calibrate`` ends (also on error)
``calibration_forward``    fake_quant — an observer is about to see a calibration batch
``fake_quant_state``       model, fake_quants, state, wrapper — answer ``True``: the scales were
                           synchronized already (before the state changes)
``train_mode``             model, training — ``model.train()``/``eval()`` changed the mode of a
                           prepared model: QAT-state fake quants now train (True) or validate
                           (False); read each one's ``active_state``
``input_batch``            stub, args — a batch reaches an input QuantStub (not during a trace)
``convert``                model, march — before the fixed-point model is built
``converted``              model — the fixed-point model is complete
``model_forward``          model, training, state — a prepared model runs a forward (not during a
                           trace); ``state``: its fake quants' FakeQuantState
``fixed_point_forward``    model — a fixed-point model runs (not during a trace)
``evaluate``               model, march — ``qk.evaluate`` on the fixed-point model
=========================  ======================================================================

Listeners are the plugins named in :data:`PLUGINS`, imported on the first announcement (so no
workflow module imports them, and importing any workflow module is enough for them to listen),
plus any registered with :func:`listen`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Listener = Callable[..., Any]

# Imported on the first emit, in this order (distributed first: statistics are merged before
# the doctor judges them). Each registers its listeners with ``listen`` when imported.
PLUGINS: tuple[str, ...] = ("qatkit.distributed.calibration", "qatkit.doctor.guards")

_listeners: dict[str, list[Listener]] = {}
_loaded = False


def listen(moment: str, fn: Listener) -> Listener:
    """Call ``fn(**payload)`` at every ``emit(moment, ...)``. Returns ``fn`` (a decorator)."""
    fns = _listeners.setdefault(moment, [])
    if fn not in fns:
        fns.append(fn)
    return fn


def on(moment: str) -> Callable[[Listener], Listener]:
    """Decorator form of :func:`listen`."""
    return lambda fn: listen(moment, fn)


def emit(moment: str, **payload: Any) -> list[Any]:
    """Announce ``moment``; return the listeners' answers that are not None."""
    if not _loaded:
        _load_plugins()
    fns = _listeners.get(moment)
    if not fns:
        return []
    answers = []
    for fn in fns:
        a = fn(**payload)
        if a is not None:
            answers.append(a)
    return answers


def _load_plugins() -> None:
    global _loaded
    _loaded = True
    for name in PLUGINS:
        importlib.import_module(name)
