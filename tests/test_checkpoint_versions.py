"""Checkpoints keep torch's per-module state_dict version metadata.

``state_dict()._metadata`` holds each module's ``_version``; modules read it when loading
(``local_metadata["version"]``): torchvision's MNASNet refuses a state without it (and with
version 1 would rebuild its stem the old way), BatchNorm reads its format from it. A round trip
of a prepared and of a converted model through ``qk.checkpoint`` and ``qk.load_prepared`` /
``qk.load_quantized`` must hand every module its own version.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.errors import QatkitError, QatkitWarning
from qatkit.fixed_point import gemm
from tests._tv_import import import_torchvision


class VersionedBlock(nn.Module):
    """A block at format version 3 that, like MNASNet, refuses to load a state without it."""

    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # type: ignore[override]
        version = local_metadata.get("version", None)
        if version != 3:
            raise ValueError(f"version should be 3 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.block = VersionedBlock()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(torch.flatten(self.pool(self.block(self.quant(x))), 1)))


def _data(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]


def _calibrated(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    p = qk.prepare(model, batches[0], qconfig=qk.default_calibration_qconfig())
    return qk.calibrate(p, batches)


def _versions(state: dict) -> dict[str, int | None]:
    return {k: v.get("version") for k, v in state._metadata.items()}  # type: ignore[attr-defined]


def test_own_versioned_block_prepared_and_converted(tmp_path: str) -> None:
    batches = _data()
    torch.manual_seed(0)
    with qk.set_march("nash-e"):
        calib = _calibrated(Net().eval(), batches)
        saved = calib.state_dict()
        assert _versions(saved)["block"] == 3 and "qatkit_meta" in saved._metadata
        path = os.path.join(tmp_path, "calib.pt")
        qk.checkpoint.save(calib, path, run="r1")
        assert _versions(qk.checkpoint.read(path)) == _versions(saved)

        torch.manual_seed(1)  # other weights: the load must bring the saved ones
        other = _calibrated(Net().eval(), _data(1))
        qk.checkpoint.load(other, path)
        rebuilt = qk.load_prepared(Net(), path, batches[0])
        with torch.no_grad():
            want = calib(batches[0])
            assert torch.equal(other(batches[0]), want)
            assert torch.equal(rebuilt(batches[0]), want)

        fixed = qk.convert(calib)
        assert _versions(fixed.state_dict())["block"] == 3
        qpath = os.path.join(tmp_path, "fixed.pt")
        qk.checkpoint.save(fixed, qpath)
        again = qk.load_quantized(Net(), qpath, batches[0])
        into = qk.convert(other)
        qk.checkpoint.load(into, qpath)
        with torch.no_grad():
            want = fixed(batches[1])
            assert torch.equal(again(batches[1]), want)
            assert torch.equal(into(batches[1]), want)


def test_state_without_versions_is_a_clear_error(tmp_path: str) -> None:
    """A state_dict copied into a plain dict lost the versions: the module's own refusal is
    turned into a qatkit error saying so and how to save instead."""
    batches = _data()
    with qk.set_march("nash-e"):
        calib = _calibrated(Net().eval(), batches)
        plain = dict(calib.state_dict())
        assert not hasattr(plain, "_metadata")
        path = os.path.join(tmp_path, "plain.pt")
        torch.save(plain, path)
        with pytest.raises(QatkitError, match="no module versions") as e:
            qk.checkpoint.load(calib, path)
        assert "version should be 3 instead of None" in str(e.value)
        assert "torch.save(model.state_dict()" in str(e.value)
        # with the versions present, a module's own ValueError is not re-labelled
        kept = OrderedDict(calib.state_dict())
        kept._metadata = OrderedDict(calib.state_dict()._metadata)  # type: ignore[attr-defined]
        kept._metadata["block"] = {"version": 2}  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="instead of 2"):
            qk.checkpoint.load_state(calib, kept)


class QuantizedStemMnasnet(nn.Module):
    """A quantized conv stem, then torchvision's mnasnet0_5 as it is (float after the
    DeQuantStub: its ``x + layers(x)`` cannot be quantized without stubs yet). Its
    ``_load_from_state_dict`` runs on every load of the checkpoint."""

    def __init__(self, tv: object) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.stem, self.relu = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
        self.net = tv.models.mnasnet0_5(weights=None, num_classes=10)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.dequant(self.relu(self.stem(self.quant(x)))))


def test_torchvision_mnasnet_round_trip(tmp_path: str) -> None:
    """torchvision's MNASNet._load_from_state_dict raises ValueError without its version."""
    tv = import_torchvision()
    batches = [b.repeat(1, 1, 2, 2) for b in _data()]  # 32x32: mnasnet downsamples 32x
    torch.manual_seed(0)
    with qk.set_march("nash-e"), warnings.catch_warnings():
        warnings.simplefilter("ignore", QatkitWarning)  # prepare's findings are not tested here
        calib = _calibrated(QuantizedStemMnasnet(tv).eval(), batches)
        assert calib.state_dict()._metadata["net"]["version"] == 2
        path = os.path.join(tmp_path, "mnasnet.pt")
        qk.checkpoint.save(calib, path)
        rebuilt = qk.load_prepared(QuantizedStemMnasnet(tv).eval(), path, batches[0])
        fixed = qk.convert(calib)
        qpath = os.path.join(tmp_path, "mnasnet_fixed.pt")
        qk.checkpoint.save(fixed, qpath)
        again = qk.load_quantized(QuantizedStemMnasnet(tv).eval(), qpath, batches[0])
    with torch.no_grad():
        assert torch.equal(rebuilt(batches[1]), calib(batches[1]))
        assert torch.equal(again(batches[1]), fixed(batches[1]))


def test_converted_weights_held_once_and_loaded_both_ways(tmp_path: str) -> None:
    """A converted conv/linear keeps its int8 weights once: the matrix its ``_int_mm`` kernel
    reads is the ``weight`` buffer's own storage (the float32 engine casts them per call). The
    state_dict still holds ``weight`` as int8 [O, C, kh, kw] / [O, K]; a contiguous state (as
    saved before this layout) loads into it, and its state loads into a module holding
    contiguous weights."""
    from qatkit.fixed_point.modules import QConv2d, QLinear
    batches = _data()
    torch.manual_seed(0)
    with qk.set_march("nash-e"):
        calibrated = _calibrated(Net().eval(), batches)
        with gemm.int8_gemm("float32"):  # float kernels cast the int8 weights at each call
            on_float = qk.convert(calibrated)
            with torch.no_grad():
                want = on_float(batches[1])
        with gemm.int8_gemm("int_mm"):
            fixed = qk.convert(calibrated)
            with torch.no_grad():
                assert torch.equal(fixed(batches[1]), want)
    weighted = {n: m for n, m in fixed.named_modules() if isinstance(m, (QConv2d, QLinear))}
    assert set(weighted) == {"block.conv", "fc"}
    (c,) = on_float.block.conv._cache.values()
    assert c["method"] == "float32" and c["w"] is None  # no float copy held
    (c,) = on_float.fc._cache.values()
    assert c["w"].untyped_storage().data_ptr() == on_float.fc.weight.untyped_storage().data_ptr()
    for m in weighted.values():
        (c,) = m._cache.values()
        assert c["method"] == "int_mm"
        assert c["w"].untyped_storage().data_ptr() == m.weight.untyped_storage().data_ptr()
        assert c["w"].untyped_storage().nbytes() == m.weight.numel()  # one int8 copy
    state = fixed.state_dict()
    assert state["block.conv.weight"].shape == (8, 3, 3, 3)
    assert state["fc.weight"].shape == (4, 8)
    assert all(state[f"{n}.weight"].dtype == torch.int8 for n in weighted)

    dense = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    dense = type(state)(dense)
    dense._metadata = state._metadata  # type: ignore[attr-defined]
    path = os.path.join(tmp_path, "dense.pt")
    torch.save(dense, path)
    torch.manual_seed(1)
    with qk.set_march("nash-e"):
        into = qk.convert(_calibrated(Net().eval(), _data(1)))
    into.load_state_dict(torch.load(path))  # contiguous weights into the column layout
    with torch.no_grad():
        assert torch.equal(into(batches[1]), want)
    for n, m in into.named_modules():
        if n in weighted:  # loading copied into the buffer: still one copy
            assert m.weight.stride() == weighted[n].weight.stride()
            m.weight = m.weight.contiguous()  # a module holding contiguous weights
    into.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(into(batches[1]), want)
