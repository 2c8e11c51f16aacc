"""Bad inputs at every public entry point: each one raises exactly ``QatkitError`` (never a
raw traceback from inside torch) whose message names the problem.

Each case is ``(id, call, code, pattern)``: ``call(env)`` must raise QatkitError with rule
``code`` and a message matching ``pattern``. ``env`` holds a float, a prepared (calibrated)
and a converted model of the same small network, built once.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.cli.main import main
from qatkit.quantization import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


class Net(nn.Module):
    def __init__(self, n_in: int = 4) -> None:
        super().__init__()
        self.quant, self.fc, self.dequant = qk.QuantStub(), nn.Linear(n_in, 3), qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.quant(x)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qa, self.qb = qk.QuantStub(), qk.QuantStub()
        self.add, self.dequant = qk.FloatFunctional(), qk.DeQuantStub()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.add.add(self.qa(a), self.qb(b)))


class NoDeQuant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc = qk.QuantStub(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.quant(x))


X = torch.randn(8, 4)
Y = torch.randint(0, 3, (8,))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Any]:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bad")
    with qk.set_march("nash-e"):
        fl = Net().eval()
        prepared = qk.prepare(fl, X[:2], qconfig=qk.default_calibration_qconfig())
        qk.calibrate(prepared, [X])
        converted = qk.convert(prepared)
        uncalibrated = qk.prepare(fl, X[:2], qconfig=qk.default_calibration_qconfig())
        other = qk.prepare(Net(5).eval(), torch.randn(2, 5),
                           qconfig=qk.default_calibration_qconfig())
    checkpoint.save(prepared, d / "prepared.pt")
    checkpoint.save(converted, d / "converted.pt")
    (d / "garbage.pt").write_bytes(b"\x80\x04 definitely not a checkpoint")
    (d / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    return {"float": fl, "prepared": prepared, "converted": converted, "dir": d,
            "uncalibrated": uncalibrated, "other": other}


def _prep(model: Any, x: Any = X[:2], **kw: Any) -> Any:
    with qk.set_march("nash-e"):
        return qk.prepare(model, x, qconfig=qk.default_calibration_qconfig(), **kw)


def _prep_q(model: Any, qconfig: Any) -> Any:
    with qk.set_march("nash-e"):
        return qk.prepare(model, X[:2], qconfig=qconfig)


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return Net()


def _calib(env: dict, data: Any, which: str = "prepared") -> Any:
    import copy
    return qk.calibrate(copy.deepcopy(env[which]), data)


def _train_converted(env: dict) -> Any:
    import copy
    m = copy.deepcopy(env["converted"]).train()
    return m(X)


VAL = qk.FakeQuantState.VALIDATION
CASES: list[tuple[str, Any, str, str]] = [
    # ---- prepare: the model
    ("prepare-none", lambda e: _prep(None), "QK000", r"qk\.prepare needs a torch\.nn\.Module, "
     r"got None"),
    ("prepare-state-dict", lambda e: _prep(e["float"].state_dict()), "QK000",
     r"needs a torch\.nn\.Module, got OrderedDict"),
    ("prepare-class", lambda e: _prep(Net), "QK000", r"needs a torch\.nn\.Module, got type"),
    ("prepare-half", lambda e: _prep(Net().half(), X[:2].half()), "QK000",
     r"parameter 'fc\.weight' is float16.*model\.float\(\)"),
    ("prepare-bfloat16", lambda e: _prep(Net().bfloat16()), "QK000",
     r"parameter 'fc\.weight' is bfloat16"),
    ("prepare-float64", lambda e: _prep(Net().double()), "QK000",
     r"parameter 'fc\.weight' is float64"),
    ("prepare-meta", lambda e: _prep(_meta_model()), "QK000", r"'fc\.weight' is on the meta "
     r"device"),
    ("prepare-converted", lambda e: _prep(e["converted"]), "QK000",
     r"got a converted \(fixed-point\) model.*cannot be prepared again"),
    ("prepare-no-dequant", lambda e: _prep(NoDeQuant()), "QK000",
     r"returns the output of 'fc'.*without a DeQuantStub"),
    ("prepare-no-march", lambda e: qk.prepare(Net(), X[:2]), "QK002", r"no march is set"),
    # ---- prepare: the example inputs
    ("example-none", lambda e: _prep(Net(), None), "QK000", r"example_inputs is None"),
    ("example-empty-tuple", lambda e: _prep(Net(), ()), "QK000", r"example_inputs is empty"),
    ("example-uint8", lambda e: _prep(Net(), torch.zeros(2, 4, dtype=torch.uint8)), "QK000",
     r"QuantStub received a uint8 tensor.*x\.float\(\) / 255"),
    ("example-int64", lambda e: _prep(Net(), torch.zeros(2, 4, dtype=torch.int64)), "QK000",
     r"QuantStub received a int64 tensor"),
    ("example-bool", lambda e: _prep(Net(), torch.zeros(2, 4, dtype=torch.bool)), "QK000",
     r"QuantStub received a bool tensor"),
    ("example-half", lambda e: _prep(Net(), X[:2].half()), "QK000",
     r"forward failed on example_inputs: RuntimeError"),
    ("example-numpy", lambda e: _prep(Net(), np.zeros((2, 4), np.float32)), "QK000",
     r"input 0 is a ndarray, not a torch\.Tensor"),
    ("example-empty-tensor", lambda e: _prep(Net(), torch.zeros(0, 4)), "QK000",
     r"input 0 is empty \(shape \(0, 4\)\)"),
    ("example-meta", lambda e: _prep(Net(), torch.empty(2, 4, device="meta")), "QK000",
     r"input 0 is on the meta device"),
    ("example-second-uint8", lambda e: _prep(TwoInputs(), (X[:2], X[:2].to(torch.uint8))),
     "QK000", r"QuantStub received a uint8 tensor"),
    ("example-wrong-shape", lambda e: _prep(Net(), torch.randn(2, 5)), "QK000",
     r"the model's forward failed on example_inputs.*RuntimeError.*mat1 and mat2"),
    ("example-missing-input", lambda e: _prep(TwoInputs(), X[:2]), "QK000",
     r"the model's forward failed on example_inputs.*TypeError.*missing"),
    ("qconfig-string", lambda e: _prep_q(Net(), "int8"), "QK000",
     r"qconfig must be a QConfig or QConfigMapping, got <class 'str'>"),
    # ---- calibrate
    ("calibrate-none-model", lambda e: qk.calibrate(None, [X]), "QK000",
     r"qk\.calibrate needs a torch\.nn\.Module, got None"),
    ("calibrate-float", lambda e: qk.calibrate(Net(), [X]), "QK000",
     r"qk\.calibrate needs a prepared model, got a float model"),
    ("calibrate-converted", lambda e: _calib(e, [X], "converted"), "QK000",
     r"got a converted \(fixed-point\) model.*cannot be calibrated"),
    ("calibrate-none-data", lambda e: _calib(e, None), "QK000", r"the data is None"),
    ("calibrate-single-tensor", lambda e: _calib(e, X), "QK000",
     r"got a single tensor of shape \(8, 4\).*\[x\]"),
    ("calibrate-int", lambda e: _calib(e, 5), "QK000", r"iterable of batches, got int"),
    ("calibrate-str", lambda e: _calib(e, "batches"), "QK000", r"iterable of batches, got str"),
    ("calibrate-dict", lambda e: _calib(e, {"x": X}), "QK000", r"iterable of batches, got dict"),
    ("calibrate-empty", lambda e: _calib(e, []), "QK008", r"calibration received no data"),
    ("calibrate-uint8", lambda e: _calib(e, [X.to(torch.uint8)]), "QK000",
     r"QuantStub received a uint8 tensor"),
    ("calibrate-int64", lambda e: _calib(e, [X.long()]), "QK000",
     r"QuantStub received a int64 tensor"),
    ("calibrate-half", lambda e: _calib(e, [X.half()]), "QK000",
     r"a fake quant received a float16 tensor"),
    ("calibrate-none-batch", lambda e: _calib(e, [None]), "QK000",
     r"a batch of type NoneType is not a tensor"),
    ("calibrate-dict-batch", lambda e: _calib(e, [{"x": X}]), "QK000",
     r"a batch of type dict is not a tensor"),
    ("calibrate-empty-tuple-batch", lambda e: _calib(e, [()]), "QK000",
     r"a batch of type tuple is not a tensor"),
    ("calibrate-pair-int64", lambda e: _calib(e, [(X.long(), Y)]), "QK000",
     r"QuantStub received a int64 tensor"),
    ("calibrate-nested-uint8", lambda e: _calib(e, [((X.to(torch.uint8),), Y)]), "QK000",
     r"QuantStub received a uint8 tensor"),
    ("calibrate-wrong-shape", lambda e: _calib(e, [torch.randn(8, 7)]), "QK000",
     r"the model's forward failed on calibration batch 0.*mat1 and mat2"),
    ("calibrate-numpy-batch", lambda e: _calib(e, [np.zeros((2, 4), np.float32)]), "QK000",
     r"a batch is a ndarray, not a torch\.Tensor"),
    # ---- set_fake_quantize
    ("state-string", lambda e: qk.set_fake_quantize(e["prepared"], "qat"), "QK000",
     r"unknown fake-quant state 'qat'"),
    ("state-none-model", lambda e: qk.set_fake_quantize(None, VAL), "QK000",
     r"set_fake_quantize needs a torch\.nn\.Module, got NoneType"),
    ("state-float", lambda e: qk.set_fake_quantize(Net().eval(), VAL), "QK000",
     r"the model has no fake quants: it was not prepared"),
    ("state-converted", lambda e: qk.set_fake_quantize(e["converted"], VAL), "QK000",
     r"got a converted \(fixed-point\) model"),
    # ---- convert
    ("convert-none", lambda e: qk.convert(None), "QK000", r"qk\.convert needs a torch\.nn\.Module"),
    ("convert-str", lambda e: qk.convert("model.pt"), "QK000", r"got str"),
    ("convert-float", lambda e: qk.convert(Net()), "QK000",
     r"qk\.convert needs a prepared model, got a float model"),
    ("convert-converted", lambda e: qk.convert(e["converted"]), "QK000",
     r"got a converted \(fixed-point\) model"),
    ("convert-uncalibrated", lambda e: qk.convert(e["uncalibrated"]), "QK008",
     r"QuantStub has no calibration/QAT statistics"),
    # ---- evaluate
    ("evaluate-none-model", lambda e: qk.evaluate(None, [(X, Y)]), "QK000",
     r"qk\.evaluate needs a torch\.nn\.Module"),
    ("evaluate-none-data", lambda e: qk.evaluate(e["prepared"], None), "QK000",
     r"the data is None"),
    ("evaluate-single-tensor", lambda e: qk.evaluate(e["prepared"], X), "QK000",
     r"got a single tensor"),
    ("evaluate-not-pairs", lambda e: qk.evaluate(e["prepared"], [X]), "QK000",
     r"batches must yield \(inputs, targets\) pairs"),
    ("evaluate-int64-inputs", lambda e: qk.evaluate(e["prepared"], [(X.long(), Y)]), "QK000",
     r"QuantStub needs a float tensor, got a int64 tensor"),
    ("evaluate-list-targets", lambda e: qk.evaluate(e["prepared"], [(X, [0] * 8)]), "QK000",
     r"targets are a list, not a tensor"),
    ("evaluate-float", lambda e: qk.evaluate(Net(), [(X, Y)]), "QK000",
     r"no qatkit metadata"),
    ("evaluate-empty", lambda e: qk.evaluate(e["prepared"], []), "QK000",
     r"evaluate got no batches"),
    # ---- the fixed-point model itself
    ("fixed-train", _train_converted, "QK000",
     r"the fixed-point model is being trained.*train the QAT model"),
    ("fixed-int64", lambda e: e["converted"](X.long()), "QK000",
     r"QuantStub needs a float tensor, got a int64 tensor"),
    ("fixed-uint8", lambda e: e["converted"](X.to(torch.uint8)), "QK000",
     r"got a uint8 tensor.*x\.float\(\) / 255"),
    ("fixed-none", lambda e: e["converted"](None), "QK000",
     r"QuantStub needs a float tensor, got NoneType"),
    # ---- checkpoints
    ("save-not-module", lambda e: checkpoint.save("net", e["dir"] / "x.pt"), "QK000",
     r"checkpoint\.save needs an nn\.Module, got str"),
    ("save-into-directory", lambda e: checkpoint.save(e["float"], e["dir"]), "QK000",
     r"is a directory; give a file name"),
    ("save-under-a-file", lambda e: checkpoint.save(e["float"], e["dir"] / "garbage.pt" / "x"),
     "QK000", r"is not a directory"),
    ("load-missing", lambda e: checkpoint.load(Net(), e["dir"] / "nope.pt"), "QK000",
     r"checkpoint '.*nope\.pt' does not exist"),
    ("load-directory", lambda e: checkpoint.load(Net(), e["dir"]), "QK000",
     r"checkpoint '.*' is a directory"),
    ("load-garbage", lambda e: checkpoint.load(Net(), e["dir"] / "garbage.pt"), "QK000",
     r"cannot read checkpoint '.*garbage\.pt'"),
    ("load-not-state-dict", lambda e: _load_obj(e, [1, 2, 3]), "QK000",
     r"a checkpoint must hold a state_dict"),
    ("load-none-model", lambda e: checkpoint.load(None, e["dir"] / "prepared.pt"), "QK000",
     r"checkpoint\.load needs an nn\.Module, got NoneType"),
    ("load-int-path", lambda e: checkpoint.load(Net(), 123), "QK000",
     r"a checkpoint path must be a str or os\.PathLike, got int"),
    ("load-prepared-into-float", lambda e: checkpoint.load(Net(), e["dir"] / "prepared.pt"),
     "QK000", r"checkpoint is of a prepared/converted model but the model is a float model"),
    ("load-converted-into-prepared", lambda e: checkpoint.load(_prep(Net().eval()),
                                                               e["dir"] / "converted.pt"),
     "QK000", r"checkpoint is of a converted model but the model is prepared"),
    ("load-other-architecture", lambda e: checkpoint.load(e["other"], e["dir"] / "prepared.pt"),
     "QK000", r"tensors do not fit the model|does not match the model's structure"),
    # ---- marches
    ("march-unknown", lambda e: qk.set_march("nash-x"), "QK002",
     r"unknown march or processor 'nash-x'"),
    ("march-none", lambda e: qk.set_march(None), "QK002", r"no march or processor given"),
    ("march-int", lambda e: qk.set_march(5), "QK002", r"no march or processor given"),
    ("march-processor-mismatch", lambda e: qk.set_march("bayes", processor="J6E"), "QK002",
     r"march 'bayes' is not the march of processor 'J6E'"),
]


def _load_obj(env: dict, obj: Any) -> Any:
    p = Path(env["dir"]) / "list.pt"
    torch.save(obj, p)
    return checkpoint.load(Net(), p)


def test_there_are_at_least_60_cases() -> None:
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_qatkit_error(case: tuple, env: dict) -> None:
    _, call, code, pattern = case
    with pytest.raises(QatkitError) as err:
        call(env)
    assert type(err.value) is QatkitError
    assert err.value.code == code, err.value
    assert re.search(pattern, str(err.value), flags=re.S), str(err.value)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_nested_batches_feed_every_input(env: dict) -> None:
    """((x1, x2), y) batches calibrate a two-input model (not a refusal)."""
    with qk.set_march("nash-e"):
        p = qk.prepare(TwoInputs().eval(), (X[:2], X[:2]),
                       qconfig=qk.default_calibration_qconfig())
        qk.calibrate(p, [((X, X * 2), Y)])
        assert qk.evaluate(p, [((X, X), Y)], metric=lambda o, t: 1.0) == 1.0


CLI_CASES = [
    (["doctor", "nofile.py:f", "--march", "nash-e"], "no such file: nofile.py"),
    (["doctor", "x.py", "--march", "nash-e"], "expected FILE.py:FUNC"),
    (["doctor", "x.py:f", "--march", "nash-e", "--input-shape", "a,b"], "bad --input-shape"),
    (["report"], "give either --demo or FILE.py:FUNC"),
    (["report", "x.py:f", "--damage", "conv1"], "--damage applies to --demo only"),
    (["report", "--demo", "--output", "r.json"], "--output must not end in .json"),
    (["demo", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_user_errors_exit_2_with_one_line(argv: list, message: str, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
