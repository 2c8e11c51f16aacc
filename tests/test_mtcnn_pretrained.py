"""MTCNN's pretrained PNet, RNet and ONet (facenet-pytorch's weights: Conv, PReLU per channel,
MaxPool2d(ceil_mode=True), Linear, Softmax), as shipped (no stubs), with PReLU and Softmax
inside the quantized region: calibrated on half of scikit-image's lfw_subset (100 faces, 100
non-faces), their face decisions on the other half agree with float and the probabilities stay
within a few softmax LSB of the fake-quant model. facenet-pytorch installs with ``--no-deps``
(.ci/run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qatkit as qk
from tests._tv_import import import_torchvision

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


@pytest.fixture(scope="module")
def faces() -> tuple[torch.Tensor, np.ndarray]:
    skdata = pytest.importorskip("skimage.data")
    imgs = torch.from_numpy(skdata.lfw_subset()).float()  # [200, 25, 25] in [0, 1]
    x = ((imgs * 255 - 127.5) * 0.0078125)[:, None].repeat(1, 3, 1, 1)  # MTCNN's input
    return x, np.r_[np.ones(100), np.zeros(100)]


@pytest.mark.parametrize("name,size,n_out", [("PNet", 12, 2), ("RNet", 24, 2),
                                              ("ONet", 48, 3)])
def test_mtcnn_face_decisions_agree_with_float(faces: tuple, name: str, size: int,
                                               n_out: int) -> None:
    import_torchvision()  # facenet_pytorch imports it
    mtcnn = pytest.importorskip("facenet_pytorch.models.mtcnn")
    torch.manual_seed(0)
    x, labels = faces
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    calib, test, y = x[0::2], x[1::2], labels[1::2]
    model = getattr(mtcnn, name)().eval()  # as facenet-pytorch ships it: no stubs
    with qk.set_march("nash-e"):
        p = qk.prepare(model, calib[:2], qconfig=qk.default_qat_qconfig())
        kinds = {type(m.op).__name__ for m in p.modules() if type(m).__name__ == "QATOp"}
        assert {"PReLU", "Softmax"} <= kinds
        stubs = [n for n in dict(p.named_modules()) if n.startswith("qatkit_ops.output_")]
        assert len(stubs) == n_out  # the region ends at every output
        qk.calibrate(p, [calib[i:i + 25] for i in range(0, len(calib), 25)])
        c = qk.convert(p)
    with torch.no_grad():
        pf, pq, pc = (mod(test)[-1].reshape(len(test), 2, -1)[:, 1, 0] for mod in (model, p, c))
    s_o = float(next(m.out_scale for m in c.modules() if type(m).__name__ == "QSoftmax"))
    assert bool(((pf > 0.5) == (pc > 0.5)).all()), "a face decision differs from float"
    assert float(((pf > 0.5).numpy() == y).mean()) >= 0.95  # the pretrained nets work here
    assert float((pc - pq).abs().max()) <= 4 * s_o
