"""QK004 multi-device calibration, QK005 camera input, QK006 QAT-only evaluation."""

from __future__ import annotations

import torch
import torch.nn as nn

import qatkit as qk
from tests.doctor_cases import case
from tests.doctor_cases._models import digits, photos, trained_digits_net


def _prepared() -> nn.Module:
    return qk.prepare(trained_digits_net(), digits().x_train[:8],
                      qconfig=qk.default_calibration_qconfig()).eval()


# ---- QK004 -----------------------------------------------------------------------------------
@case("QK004", "torch.ao eager")
def data_parallel_calibration():
    with qk.set_march("nash-e"):
        qk.set_fake_quantize(nn.DataParallel(_prepared()), qk.FakeQuantState.CALIBRATION)


@case("QK004", "loops")
def wrapped_in_data_parallel_after_the_state():
    with qk.set_march("nash-e"):
        calib = _prepared()
        qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
        dp = nn.DataParallel(calib)
        with torch.no_grad():
            for i in range(0, 64, 32):
                dp(digits().x_train[i:i + 32])


def _one_process_group(fn):
    import tempfile

    import torch.distributed as dist
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/pg", rank=0, world_size=1)
        try:
            return fn()
        finally:
            dist.destroy_process_group()


@case("QK004", "qatkit")
def ddp_wrapped_calibration():
    def run():
        with qk.set_march("nash-e"):
            ddp = nn.parallel.DistributedDataParallel(_prepared())
            qk.set_fake_quantize(ddp, qk.FakeQuantState.CALIBRATION)
    _one_process_group(run)


@case("QK004", "helper method")
def calibration_batches_through_ddp():
    def run():
        with qk.set_march("nash-e"):
            calib = _prepared()
            qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
            ddp = nn.parallel.DistributedDataParallel(calib)
            with torch.no_grad():
                ddp(digits().x_train[:32])
    _one_process_group(run)


def every_rank_calibrates(rank: int, world: int) -> str:
    """Each rank calibrates its own shard without synchronization (the DDP habit)."""
    torch.set_num_threads(1)
    from tests.doctor_cases import observe
    with qk.set_march("nash-e"):
        seen = observe(lambda: qk.calibrate(_prepared(), digits().x_train[rank::world][:64]
                                            .split(32)))
    return ",".join(seen.codes)


@case("QK004", "multi-process", slow=True)
def unsynchronized_calibration_on_every_rank():
    from qatkit.distributed.launch import spawn
    codes = spawn(every_rank_calibrates, 2, threads=1)
    if "QK004" in codes[1]:
        from qatkit.base.errors import fail
        raise fail("QK004", f"rank 1 refused: {codes}")


# ---- QK005 -----------------------------------------------------------------------------------
class CameraNet(nn.Module):
    def __init__(self, scale: float | None = 1 / 128) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(scale=scale), qk.DeQuantStub()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.pool(self.conv(self.quant(x))).flatten(1)))


def _calibrate_on(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    with qk.set_march("nash-e"):
        calib = qk.prepare(model, x[:2], qconfig=qk.default_calibration_qconfig(), **kw)
        return qk.calibrate(calib, [x])


@case("QK005", "qatkit")
def declared_camera_with_a_calibrated_stub():
    _calibrate_on(CameraNet(scale=None), photos().float() / 255, input_source="camera")


@case("QK005", "qatkit")
def rgb_01_photos_on_j6e_with_the_camera_scale():
    _calibrate_on(CameraNet(), photos().float() / 255, processor="J6E")


@case("QK005", "torchvision")
def rgb_normalised_to_pm1_on_j6e():
    _calibrate_on(CameraNet(), photos().float() / 127.5 - 1, processor="J6E")


@case("QK005", "torch.ao eager")
def imagenet_normalised_rgb_at_the_camera_scale():
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (photos().float() / 255 - mean) / std
    with qk.set_march("nash-e"):
        return qk.doctor.check(CameraNet(), x[:1], processor="J6E", calibration_inputs=x)


@case("QK005", "qatkit")
def centered_yuv_not_divided_by_128():
    from qatkit.base.colour import rgb_to_yuv444
    _calibrate_on(CameraNet(), rgb_to_yuv444(photos(), centered=True).float(),
                  input_source="camera")


# ---- QK006 -----------------------------------------------------------------------------------
def _qat() -> tuple[nn.Module, torch.optim.Optimizer]:
    d = digits()
    with qk.set_march("nash-e"):  # the documented flow: QAT starts from the calibration
        calib = qk.calibrate(_prepared(), d.x_train[:256].split(64))
        qat = qk.prepare(trained_digits_net(), d.x_train[:8], qconfig=qk.default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
    return qat, torch.optim.SGD(qat.parameters(), 1e-3, momentum=0.9)


def _train(qat: nn.Module, opt: torch.optim.Optimizer) -> None:
    d = digits()
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    for i in range(0, 256, 64):
        opt.zero_grad()
        nn.functional.cross_entropy(qat(d.x_train[i:i + 64]), d.y_train[i:i + 64]).backward()
        opt.step()


def _val(model: nn.Module, batch: int = 450) -> float:
    d = digits()
    from qatkit.quantization.fake_quant import fake_quants
    if fake_quants(model):
        model.eval()
        qk.set_fake_quantize(model, qk.FakeQuantState.VALIDATION)
    with torch.no_grad():
        hits = sum(int((model(d.x_test[i:i + batch]).argmax(1) ==
                        d.y_test[i:i + batch]).sum()) for i in range(0, 450, batch))
    return hits / 450


@case("QK006", "loops")
def accuracy_in_batches_each_epoch():
    qat, opt = _qat()
    with qk.set_march("nash-e"):
        for _ in range(3):
            _train(qat, opt)
            _val(qat, batch=64)


@case("QK006", "qatkit")
def one_full_batch_evaluation_per_epoch():
    qat, opt = _qat()
    with qk.set_march("nash-e"):
        for _ in range(3):
            _train(qat, opt)
            _val(qat)


@case("QK006", "helper method")
def a_smoke_test_convert_before_training():
    qat, opt = _qat()
    with qk.set_march("nash-e"):
        _val(qk.convert(qat))
        for _ in range(3):
            _train(qat, opt)
            _val(qat)


@case("QK006", "nested submodules")
def the_fixed_point_model_of_another_run():
    qat, opt = _qat()
    other, _ = _qat()
    with qk.set_march("nash-e"):
        _val(qk.convert(other))
        for _ in range(2):
            _train(qat, opt)
            _val(qat)
            _val(qk.convert(other))  # evaluates the wrong fixed-point model
        _train(qat, opt)
        _val(qat)


@case("QK006", "torch.ao eager")
def calibrated_model_evaluated_as_the_result():
    d = digits()
    with qk.set_march("nash-e"):
        calib = qk.calibrate(_prepared(), d.x_train[:256].split(64))
        for i in range(0, 450, 16):
            with torch.no_grad():
                calib(d.x_test[i:i + 16])
