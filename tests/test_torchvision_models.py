"""torchvision's real model definitions, unmodified (no stubs, no FloatFunctional,
weights=None), through the whole workflow on real photos: prepare, calibrate, one QAT step
with backward, convert, fixed-point forward, checkpoint round trip (tests/_tv_workflow.py).

CI runs a representative subset, one model per construct (``+=`` residuals, ``x + f(x)``,
functional pooling, ``torch.cat``, ``chunk``/``mean``, squeeze-excitation ``x * se(x)``, and
torchvision's quantizable definitions with and without ``fuse_model()``). Every model of the
list runs with ``pytest --sweep tests/test_torchvision_models.py``; its SQNR table is in
docs/models.md."""

from __future__ import annotations

import math

import pytest

from tests._tv_workflow import MODELS, QUANTIZABLE, build, run

# one model per construct; the rest only in the sweep
SUBSET = ("resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x1_0")
# fixed point against the fake-quant model it was converted from. Each layer adds at most one
# LSB (tests/test_call_sites.py, the bit-exact tests); through 20-50 layers of random weights
# those flips grow to 8-30 dB at the output (docs/models.md). A broken operator gives ~0 dB.
MIN_SQNR_DB = 3.0
CI_SIZE = 32  # the subset runs on smaller photos than the sweep, to keep the suite short


def _check(result: dict) -> None:
    assert result["reload_identical"], "the reloaded fixed-point model differs"
    assert result["sqnr_db"] >= MIN_SQNR_DB or math.isinf(result["sqnr_db"]), result
    # a clean real model gets no warning at prepare (no storm of per-layer findings)
    assert result["warnings"] == [], result["warnings"][:3]


def _params(names: tuple[str, ...], sweep: bool) -> list:
    marks = [pytest.mark.sweep] if sweep else []
    return [pytest.param(n, marks=marks, id=n) for n in names]


@pytest.mark.parametrize("name", _params(SUBSET, False)
                         + _params(tuple(n for n in MODELS if n not in SUBSET), True))
def test_plain_definition(name: str) -> None:
    _check(run(build(name), MODELS[name][1] if name not in SUBSET else CI_SIZE))


@pytest.mark.parametrize("fused", [False, True], ids=["as_is", "fuse_model"])
@pytest.mark.parametrize("name", _params(("resnet18",), False)
                         + _params(tuple(n for n in QUANTIZABLE if n != "resnet18"), True))
def test_quantizable_definition(name: str, fused: bool) -> None:
    size = CI_SIZE if name == "resnet18" else MODELS[name][1]
    _check(run(build(name, quantizable=True), size, fuse_first=fused))
