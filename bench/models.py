"""Benchmark CNNs, written the way a torch.ao eager-mode quantization user writes them.

QuantStub / DeQuantStub at the input and output, Conv-BN-ReLU as separate modules (fused later
by ``torch.ao.quantization.fuse_modules[_qat]`` with the names from :func:`fuse_spec`), and
``FloatFunctional.add_relu`` for residual adds, as in torchvision's quantizable ResNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

__all__ = [
    "MODELS",
    "BasicBlock",
    "ResNet18Like",
    "SmallCNN",
    "count_macs",
    "count_params",
    "fuse_spec",
    "resnet18_like",
    "small_cnn",
]


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, (downsample conv-bn), add + relu."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.skip_add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.skip_add_relu.add_relu(out, identity)

    def fuse_groups(self, prefix: str = "") -> list[list[str]]:
        groups = [
            [f"{prefix}conv1", f"{prefix}bn1", f"{prefix}relu1"],
            [f"{prefix}conv2", f"{prefix}bn2"],
        ]
        if self.downsample is not None:
            groups.append([f"{prefix}downsample.0", f"{prefix}downsample.1"])
        return groups


class ResNet18Like(nn.Module):
    """ResNet-18 topology (64-128-256-512 channels, 2 BasicBlocks per stage) for 3x224x224."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        in_ch = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(in_ch, width, stride), BasicBlock(width, width, 1))
            self.add_module(f"layer{i + 1}", layer)
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(512, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.fc(self.flatten(self.avgpool(x)))
        return self.dequant(x)

    def fuse_groups(self) -> list[list[str]]:
        groups = [["conv1", "bn1", "relu"]]
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}")
            for j, block in enumerate(layer):
                groups += block.fuse_groups(f"layer{i}.{j}.")
        return groups


class SmallCNN(nn.Module):
    """Five conv-bn layers with ReLUs (the fourth's through the residual ``add_relu``), global
    average pool and a linear head; 16-32-32-32-64 channels, two stride-2 convs.

    Made for 1x28x28 (Fashion-MNIST); works on any input of at least 4x4 (e.g. 8x8 digits).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.skip_add_relu = FloatFunctional()
        self.conv5 = nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(4 * w)
        self.relu5 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4 * w, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        y = self.relu3(self.bn3(self.conv3(x)))
        y = self.bn4(self.conv4(y))
        x = self.skip_add_relu.add_relu(y, x)
        x = self.relu5(self.bn5(self.conv5(x)))
        x = self.fc(self.flatten(self.pool(x)))
        return self.dequant(x)

    def fuse_groups(self) -> list[list[str]]:
        return [
            ["conv1", "bn1", "relu1"],
            ["conv2", "bn2", "relu2"],
            ["conv3", "bn3", "relu3"],
            ["conv4", "bn4"],
            ["conv5", "bn5", "relu5"],
        ]


def resnet18_like(num_classes: int = 1000) -> ResNet18Like:
    """ResNet-18-sized eager-quantizable CNN for 3x224x224 input (11.7 M params at 1000 classes)."""
    return ResNet18Like(num_classes)


def small_cnn(num_classes: int = 10) -> SmallCNN:
    """Small eager-quantizable CNN for 1x28x28 input."""
    return SmallCNN(num_classes)


def fuse_spec(model: nn.Module) -> list[list[str]]:
    """Module-name groups for ``torch.ao.quantization.fuse_modules`` / ``fuse_modules_qat``."""
    groups = getattr(model, "fuse_groups", None)
    if groups is None:
        raise TypeError(f"{type(model).__name__} has no fuse_groups(); not a bench model")
    return groups()


#: name -> (constructor, input shape (C, H, W) of one image, number of classes).
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], int]] = {
    "resnet18_like": (resnet18_like, (3, 224, 224), 1000),
    "small_cnn": (small_cnn, (1, 28, 28), 10),
}


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates for ONE image, from forward hooks on Conv2d and Linear.

    Conv: ``output elements * (in_channels / groups) * kh * kw``; Linear: ``output elements *
    in_features``. BN, ReLU, pooling and adds are not counted. Returns ``{"conv": .., "linear":
    .., "total": ..}``.
    """
    counts = {"conv": 0, "linear": 0}

    def conv_hook(mod: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kh, kw = mod.kernel_size
        counts["conv"] += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        counts["linear"] += out[0].numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    counts["total"] = counts["conv"] + counts["linear"]
    return counts
