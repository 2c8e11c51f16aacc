"""qatkit: PyTorch CNNs from float to a bit-exact integer model for BPU-style NPUs.

Workflow::

    import qatkit as qk
    qk.set_march("nash-e")
    calib = qk.prepare(model, example_inputs, qconfig=qk.default_calibration_qconfig())
    qk.calibrate(calib, calibration_batches)
    qat = qk.prepare(model, example_inputs, qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    qat.train()  # QAT; qat.eval() validates with frozen scales
    ...  # train
    quantized = qk.convert(qat)

The names below are loaded on first use (``import qatkit`` itself imports no torch), from the
subpackages that own them: ``qatkit.base``, ``qatkit.quantization``, ``qatkit.fixed_point``,
``qatkit.distributed``, ``qatkit.doctor``, ``qatkit.analysis``, ``qatkit.export``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qatkit.base import VERSION as __version__

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("QatkitError", "QatkitWarning", "set_strict", "silence", "strict"),
                    "qatkit.base.errors"),
    **dict.fromkeys(("MARCHES", "March", "get_march", "set_march"), "qatkit.base.march"),
    "QTensor": "qatkit.base.qtensor",
    **dict.fromkeys(("QuantStub", "DeQuantStub", "FloatFunctional"),
                    "qatkit.quantization.stubs"),
    **dict.fromkeys(("QConfig", "QConfigMapping", "QuantSpec", "default_calibration_qconfig",
                     "default_qat_qconfig", "fixed_scale_qconfig"),
                    "qatkit.quantization.qconfig"),
    **dict.fromkeys(("FakeQuantize", "FakeQuantState", "set_fake_quantize"),
                    "qatkit.quantization.fake_quant"),
    **dict.fromkeys(("set_consistency_level", "get_consistency_level"),
                    "qatkit.quantization.consistency"),
    "fuse": "qatkit.quantization.fuse",
    "prepare": "qatkit.quantization.prepare",
    "calibrate": "qatkit.quantization.calibrate",
    "convert": "qatkit.quantization.convert",
    **dict.fromkeys(("FixedPointMonitor", "GapRecord", "evaluate"),
                    "qatkit.quantization.evaluate"),
    **dict.fromkeys(("load_prepared", "load_quantized"), "qatkit.quantization.rebuild"),
    "QCenteredYUVToRGB": "qatkit.fixed_point.yuv_input",
    "insert_yuv_input": "qatkit.quantization.deploy_input",
    "check_overfitting": "qatkit.doctor.rules.qk009_overfitting",
    "export_onnx": "qatkit.export",
    "summary": "qatkit.analysis.summary",
}
# public submodules: qk.checkpoint.save(...), qk.doctor.check(...), ...
_MODULES: dict[str, str] = {
    "checkpoint": "qatkit.quantization.checkpoint",
    "colour": "qatkit.base.colour",
    "distributed": "qatkit.distributed",
    "doctor": "qatkit.doctor",
}

__all__ = [
    "MARCHES",
    "DeQuantStub",
    "FakeQuantState",
    "FakeQuantize",
    "FixedPointMonitor",
    "FloatFunctional",
    "GapRecord",
    "March",
    "QCenteredYUVToRGB",
    "QConfig",
    "QConfigMapping",
    "QTensor",
    "QatkitError",
    "QatkitWarning",
    "QuantSpec",
    "QuantStub",
    "__version__",
    "calibrate",
    "check_overfitting",
    "checkpoint",
    "colour",
    "convert",
    "default_calibration_qconfig",
    "default_qat_qconfig",
    "distributed",
    "doctor",
    "evaluate",
    "export_onnx",
    "fixed_scale_qconfig",
    "fuse",
    "get_consistency_level",
    "get_march",
    "insert_yuv_input",
    "load_prepared",
    "load_quantized",
    "prepare",
    "set_consistency_level",
    "set_fake_quantize",
    "set_march",
    "set_strict",
    "silence",
    "strict",
    "summary",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'qatkit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from qatkit.analysis.summary import summary
    from qatkit.base.errors import QatkitError, QatkitWarning, set_strict, silence, strict
    from qatkit.base.march import MARCHES, March, get_march, set_march
    from qatkit.base.qtensor import QTensor
    from qatkit.doctor.rules.qk009_overfitting import check_overfitting
    from qatkit.export import export_onnx
    from qatkit.fixed_point.yuv_input import QCenteredYUVToRGB
    from qatkit.quantization import checkpoint
    from qatkit.quantization.calibrate import calibrate
    from qatkit.quantization.convert import convert
    from qatkit.quantization.deploy_input import insert_yuv_input
    from qatkit.quantization.evaluate import FixedPointMonitor, GapRecord, evaluate
    from qatkit.quantization.fake_quant import FakeQuantize, FakeQuantState, set_fake_quantize
    from qatkit.quantization.fuse import fuse
    from qatkit.quantization.prepare import prepare
    from qatkit.quantization.qconfig import (
        QConfig,
        QConfigMapping,
        QuantSpec,
        default_calibration_qconfig,
        default_qat_qconfig,
        fixed_scale_qconfig,
    )
    from qatkit.quantization.rebuild import load_prepared, load_quantized
    from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub
