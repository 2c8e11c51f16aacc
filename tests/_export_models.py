"""Small models for the export tests: every fixed-point module kind, prepared and converted."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk
from qatkit.quantization.calibrate import calibrate


class AllOps(nn.Module):
    """Conv (+BN+ReLU, depthwise + fused ReLU6), transposed conv, sigmoid/tanh/hardswish
    tables, standalone Hardtanh, avg/max/adaptive pools, bilinear and nearest resize, every
    FloatFunctional method, flatten/reshape, linear, and a high-precision conv head."""

    def __init__(self, conv_transpose: bool = True) -> None:
        super().__init__()
        self.conv_transpose = conv_transpose
        self.quant, self.quant2 = qk.QuantStub(), qk.QuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.relu6 = nn.ReLU6()
        self.sig, self.tanh, self.hsw = nn.Sigmoid(), nn.Tanh(), nn.Hardswish()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.ct = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.ff = nn.ModuleDict({k: qk.FloatFunctional() for k in (
            "add", "sub", "mul", "cat", "add_scalar", "mul_scalar", "max", "min", "mean",
            "stack", "sum", "matmul", "add_relu")})
        self.pool, self.avg = nn.MaxPool2d(2), nn.AvgPool2d(2)
        self.htanh = nn.Hardtanh(-0.5, 0.5)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)
        self.head = nn.Conv2d(16, 4, 1)
        self.dequant, self.dequant2, self.dequant3 = (qk.DeQuantStub(), qk.DeQuantStub(),
                                                      qk.DeQuantStub())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        ff = self.ff
        x = self.relu(self.bn(self.conv(self.quant(x))))          # [N, 8, 8, 8]
        y = self.quant2(y)                                        # [N, 8, 4, 4]
        d = self.relu6(self.dw(x))                                # [N, 8, 4, 4]
        a = ff["add"].add(self.sig(d), self.tanh(y))
        s = ff["sub"].sub(a, self.hsw(d))
        m = ff["mul"].mul(s, ff["add_scalar"].add_scalar(y, 0.25))
        m = ff["max"].maximum(ff["mul_scalar"].mul_scalar(m, -1.5), ff["min"].minimum(d, y))
        u = self.up(m)                                            # [N, 8, 8, 8]
        t = self.ct(d) if self.conv_transpose else self.up2(d)   # [N, 8, 8, 8]
        c = ff["cat"].cat([u, ff["add_relu"].add_relu(t, x)], 1)  # [N, 16, 8, 8]
        c = self.htanh(self.avg(F.interpolate(self.pool(c), scale_factor=2)))  # [N, 16, 4, 4]
        hp = self.head(c)                                         # high-precision output
        g = self.gap(c).flatten(1)                                # [N, 16]
        z = self.fc(g.reshape(g.shape[0], 16))
        st = ff["stack"].stack([z, z], 1)                         # [N, 2, 5]
        mm = ff["matmul"].matmul(st, st.transpose(1, 2))          # [N, 2, 2]
        me = ff["mean"].mean(mm, 2)
        su = ff["sum"].sum(st, 1)
        return self.dequant(me), self.dequant2(su), self.dequant3(hp)


def allops_inputs(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 8, 4, 4, generator=g)


def prepared_and_converted(model: nn.Module, inputs: Any, march: str, qconfig: Any = None,
                           batches: int = 3, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Calibrate ``model`` on random batches shaped like ``inputs`` and convert it; returns
    (the prepared model in VALIDATION state, the fixed-point model)."""
    calib = calibrated(model, inputs, march, qconfig, batches, seed)
    with qk.set_march(march):
        return calib, qk.convert(calib)


class NormActOps(nn.Module):
    """The operators of docs/fixed-point.md sections 10 and 14-17: PReLU (per channel and one
    slope), LeakyReLU, LayerNorm2d (channels first) and LayerNorm (last dim), GELU (erf and
    tanh tables), AvgPool2d with ceil_mode + count_include_pad=False and with
    divisor_override, Softmax over axis 1 and the last axis."""

    def __init__(self) -> None:
        super().__init__()
        from tests._tv_import import import_torchvision
        layer_norm2d = import_torchvision().models.convnext.LayerNorm2d
        self.quant = qk.QuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu, self.prelu1 = nn.PReLU(8), nn.PReLU(1)
        self.leaky = nn.LeakyReLU(0.1)
        self.ln2d, self.ln = layer_norm2d(8), nn.LayerNorm(4)
        self.gelu, self.gelu_tanh = nn.GELU(), nn.GELU(approximate="tanh")
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.pool2 = nn.AvgPool2d(2, divisor_override=3)
        self.fc = nn.Linear(32, 6)
        self.softmax, self.softmax_last = nn.Softmax(dim=1), nn.Softmax(dim=-1)
        self.dequant, self.dequant2 = qk.DeQuantStub(), qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> Any:
        x = self.leaky(self.prelu(self.conv(self.quant(x))))    # [N, 8, 7, 7]
        x = self.pool(self.gelu(self.ln2d(x)))                  # [N, 8, 4, 4]
        a = self.softmax_last(self.gelu_tanh(self.ln(x)))
        y = self.prelu1(self.pool2(x))                          # [N, 8, 2, 2]
        y = self.softmax(self.fc(y.flatten(1)))
        return self.dequant(a), self.dequant2(y)


class NormVariants(nn.Module):
    """LayerNorm over many values (int16: fewer guard bits G) without affine parameters, over
    two dims, PReLU per channel on [N, C] and Softmax on a 3-d tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.fc1, self.fc2 = nn.Linear(12, 300), nn.Linear(300, 8)
        self.ln_wide = nn.LayerNorm(300, elementwise_affine=False)
        self.prelu = nn.PReLU(300)
        self.ln_2d = nn.LayerNorm([2, 4])
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> Any:
        x = self.prelu(self.ln_wide(self.fc1(self.quant(x))))
        x = self.ln_2d(self.fc2(x).reshape(x.shape[0], 2, 4))
        return self.dequant(self.softmax(x))


class ProfileNet(nn.Module):
    """What the onnxruntime target profile mirrors: conv+BN+ReLU, depthwise conv+ReLU6, max
    pooling, 1x1 conv+ReLU, flatten and a linear head (quantized output)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), \
            nn.ReLU()
        self.dw, self.relu6 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(16, 8, 1), nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.pool(self.relu6(self.dw(x)))
        x = self.relu3(self.conv3(x))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def calibrated(model: nn.Module, inputs: Any, march: str, qconfig: Any = None, batches: int = 3,
               seed: int = 0) -> nn.Module:
    """:func:`prepared_and_converted`'s calibrated model (VALIDATION state), not converted."""
    torch.manual_seed(seed)
    ins = inputs if isinstance(inputs, tuple) else (inputs,)
    g = torch.Generator().manual_seed(seed + 1)
    with qk.set_march(march):
        calib = qk.prepare(model, inputs, qconfig=qconfig or qk.default_calibration_qconfig())
        data = [tuple(torch.randn(t.shape, generator=g) for t in ins) for _ in range(batches)]
        calibrate(calib, data if len(ins) > 1 else [d[0] for d in data], progress=False)
        calib.eval()
        qk.set_fake_quantize(calib, qk.FakeQuantState.VALIDATION)
    return calib
