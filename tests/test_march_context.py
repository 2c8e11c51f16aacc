"""``set_march`` is per thread / context, and a prepared model keeps its own march."""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.march import get_march
from qatkit.quantization import meta


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc, self.dequant = qk.QuantStub(), nn.Linear(4, 2), qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.quant(x)))


def test_two_threads_with_different_marches_never_mix() -> None:
    both_set = threading.Barrier(2, timeout=30)
    seen: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def work(march: str) -> None:
        try:
            qk.set_march(march)
            both_set.wait()  # the other thread has set its march too
            prepared = qk.prepare(Tiny().eval(), torch.randn(2, 4),
                                  qconfig=qk.default_calibration_qconfig())
            qk.calibrate(prepared, [torch.randn(8, 4)])
            both_set.wait()
            seen[march] = (get_march().name, meta.get(prepared).march,
                           meta.get(qk.convert(prepared)).march)
        except BaseException as e:  # reported below, with the thread's march
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in ("nash-e", "bernoulli")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen == {"nash-e": ("nash-e",) * 3, "bernoulli": ("bernoulli",) * 3}
    assert get_march() is None  # neither thread's setting leaked into this one


def test_context_manager_restores_and_a_new_thread_starts_without_a_march() -> None:
    with qk.set_march("bayes"):
        assert get_march().name == "bayes"
        inner: list = []
        t = threading.Thread(target=lambda: inner.append(get_march()))
        t.start()
        t.join()
        assert inner == [None]
    assert get_march() is None
