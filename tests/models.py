"""Clean real architectures, written the way users write them for quantization.

* :class:`ResNet`: basic or bottleneck residual blocks, residual add through a FloatFunctional
  (``resnet_small`` for tests, ``resnet50_style`` with ResNet-50's layer sizes for timing);
* :class:`MobileNetV2`: depthwise separable inverted residuals, ReLU6, FloatFunctional add;
* :class:`UNet`: encoder/decoder with FloatFunctional cat skips, ConvTranspose2d, nearest and
  bilinear ``nn.Upsample``;
* :class:`AoEagerNet`: a model written for torch.ao eager mode (torch.ao stubs and
  FloatFunctional, torch.ao qconfig attribute), optionally fused by torch.ao's fuse_modules.

Each ``make_*`` returns ``(model, example_inputs)`` with the model in eval mode and BN
statistics that are not the identity (a few forward passes in train mode on random data).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import qatkit as qk


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


# --------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(width, cout, 3)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)
        self.add = qk.FloatFunctional()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add.add(out, identity))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)
        self.add = qk.FloatFunctional()
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.add.add(out, identity))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: list[int], widths: list[int],
                 num_classes: int = 10, stem: int = 16, imagenet_stem: bool = False) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        if imagenet_stem:  # 7x7/2 conv + 3x3/2 max pool
            self.stem = nn.Sequential(*_conv_bn(3, stem, 7, 2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(*_conv_bn(3, stem, 3), nn.ReLU(inplace=True))
        cin, stages = stem, []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(self.quant(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.dequant(self.fc(x))


# ----------------------------------------------------------------------------- MobileNetV2
class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1
                 ) -> None:
        super().__init__(*_conv_bn(cin, cout, k, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   *_conv_bn(hidden, cout, 1)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.skip_add = qk.FloatFunctional() if self.use_res else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_add is not None:
            return self.skip_add.add(x, self.conv(x))
        return self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride), a narrow version of the paper's table
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, num_classes: int = 10, width: float = 0.5) -> None:
        super().__init__()
        c = max(8, int(32 * width))
        feats: list[nn.Module] = [ConvBNReLU6(3, c, 3, 2)]
        for t, ch, n, s in self.SETTINGS:
            cout = max(8, int(ch * width))
            for i in range(n):
                feats.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        last = max(64, int(320 * width))
        feats.append(ConvBNReLU6(c, last, 1))
        self.quant = qk.QuantStub()
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.quant(x))).flatten(1)
        return self.dequant(self.classifier(x))


# ------------------------------------------------------------------------------------ U-Net
class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(*_conv_bn(cin, cout, 3), nn.ReLU(inplace=True),
                         *_conv_bn(cout, cout, 3), nn.ReLU(inplace=True))


class Up(nn.Module):
    """Upsample the deeper map, concatenate the skip (FloatFunctional cat), double conv."""

    def __init__(self, cin: int, cskip: int, cout: int, how: str) -> None:
        super().__init__()
        if how == "transposed":
            self.up: nn.Module = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            cup = cin // 2
        else:
            kw = {"align_corners": False} if how == "bilinear" else {}
            self.up = nn.Upsample(scale_factor=2, mode=how, **kw)
            cup = cin
        self.cat = qk.FloatFunctional()
        self.conv = DoubleConv(cup + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(self.cat.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    def __init__(self, in_ch: int = 3, classes: int = 4, base: int = 8) -> None:
        super().__init__()
        b = base
        self.quant = qk.QuantStub()
        self.enc1, self.enc2 = DoubleConv(in_ch, b), DoubleConv(b, 2 * b)
        self.enc3, self.bottom = DoubleConv(2 * b, 4 * b), DoubleConv(4 * b, 8 * b)
        self.pool1, self.pool2, self.pool3 = nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.up3 = Up(8 * b, 4 * b, 4 * b, "transposed")
        self.up2 = Up(4 * b, 2 * b, 2 * b, "bilinear")
        self.up1 = Up(2 * b, b, b, "nearest")
        self.head = nn.Conv2d(b, classes, 1)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        e3 = self.enc3(self.pool2(e2))
        y = self.bottom(self.pool3(e3))
        y = self.up1(self.up2(self.up3(y, e3), e2), e1)
        return self.dequant(self.head(y))


# ------------------------------------------------------------------------ torch.ao eager mode
class AoEagerNet(nn.Module):
    """As in the torch.ao eager-mode tutorial: torch.ao stubs, FloatFunctional, qconfig attr."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        from torch.ao.nn.quantized import FloatFunctional
        from torch.ao.quantization import DeQuantStub, QuantStub
        self.quant = QuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), \
            nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.skip_add = FloatFunctional()
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), \
            nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.skip_add.add(self.bn2(self.conv2(x)), x))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


AO_FUSE = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["conv3", "bn3", "relu3"]]


# ---------------------------------------------------------------------------------- makers
def warm_bn(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Give BN layers non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x * (1 + 0.1 * i))
    return model.eval()


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make_resnet(size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = ResNet(BasicBlock, [2, 2, 2], [16, 32, 64])
    x = _x((2, 3, size, size))
    return warm_bn(m, x), x


def make_mobilenet_v2(size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = MobileNetV2()
    x = _x((2, 3, size, size))
    return warm_bn(m, x), x


def make_unet(size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = UNet()
    x = _x((2, 3, size, size))
    return warm_bn(m, x), x


def make_ao_eager(fused: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = AoEagerNet()
    x = _x((2, 3, 16, 16))
    warm_bn(m, x)
    m.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    if fused:
        m = torch.ao.quantization.fuse_modules(m, AO_FUSE)
    return m, x


def resnet50_style(num_classes: int = 1000) -> nn.Module:
    """ResNet-50's layer sizes (25.6M parameters), quantization-ready."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, stem=64,
                  imagenet_stem=True)


ARCHITECTURES = {"resnet": make_resnet, "mobilenet_v2": make_mobilenet_v2, "unet": make_unet,
                 "ao_eager": make_ao_eager}
