"""qatkit: PyTorch CNNs from float to a bit-exact integer model for BPU-style NPUs.

Workflow::

    import qatkit as qk
    qk.set_march("nash-e")
    calib = qk.prepare(model, example_inputs, qconfig=qk.default_calibration_qconfig())
    calib.eval(); qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
    ...  # feed calibration batches
    qat = qk.prepare(model, example_inputs, qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    qat.train(); qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    ...  # train
    quantized = qk.convert(qat)
"""

from qatkit import checkpoint, colour, distributed, doctor
from qatkit.calibrate import calibrate
from qatkit.convert import convert
from qatkit.deploy_colour import QCenteredYUVToRGB, insert_yuv_input
from qatkit.errors import QatkitError, QatkitWarning, set_strict, silence, strict
from qatkit.evaluate import FixedPointMonitor, GapRecord, evaluate
from qatkit.fake_quant import FakeQuantize, FakeQuantState, set_fake_quantize
from qatkit.fuse import fuse
from qatkit.march import MARCHES, March, get_march, set_march
from qatkit.prepare import prepare
from qatkit.qconfig import (
    QConfig,
    QConfigMapping,
    QuantSpec,
    default_calibration_qconfig,
    default_qat_qconfig,
    fixed_scale_qconfig,
)
from qatkit.qtensor import QTensor
from qatkit.rules.qk009_overfitting import check_overfitting
from qatkit.stubs import DeQuantStub, FloatFunctional, QuantStub

__version__ = "0.1.0"

__all__ = [
    "MARCHES", "DeQuantStub", "FakeQuantState", "FakeQuantize", "FixedPointMonitor",
    "FloatFunctional", "GapRecord", "March", "QCenteredYUVToRGB", "QConfig", "QConfigMapping",
    "QTensor", "QatkitError", "QatkitWarning", "QuantSpec", "QuantStub", "__version__",
    "calibrate", "check_overfitting", "checkpoint", "colour", "convert",
    "default_calibration_qconfig", "default_qat_qconfig", "distributed", "doctor", "evaluate",
    "fixed_scale_qconfig", "fuse", "get_march", "insert_yuv_input", "prepare",
    "set_fake_quantize", "set_march", "set_strict", "silence", "strict",
]
