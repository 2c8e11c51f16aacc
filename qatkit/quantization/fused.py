"""Float modules produced by ``fuse``: a conv (BN folded in) or linear with its activation.

Fusion is a float-model transformation that keeps the float function: ``FusedConv2d(x)`` equals
``relu(bn(conv(x)))`` of the original modules in eval mode. BN is folded with its running
statistics (the vendor's default ``fuse_bn`` QAT mode); a standalone BatchNorm2d becomes a
1x1 depthwise FusedConv2d (a per-channel affine).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

ACTIVATIONS = {
    None: lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
}


class FusedConv2d(nn.Conv2d):
    """Conv2d (+ folded BN) + optional ReLU/ReLU6. ``feeds_add`` marks a conv whose output goes
    straight into a FloatFunctional add (conv+add fusion: no quantization in between)."""

    activation: str | None = None
    feeds_add: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](super().forward(x))


class FusedLinear(nn.Linear):
    activation: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](super().forward(x))


def fold_bn(conv: nn.Conv2d | None, bn: nn.BatchNorm2d) -> FusedConv2d:
    """A FusedConv2d equal to ``bn(conv(x))`` with BN's running statistics."""
    if bn.running_var is None or bn.running_mean is None:
        from qatkit.base.errors import fail
        raise fail("QK000", "a BatchNorm2d without running statistics cannot be folded.",
                   "use track_running_stats=True")
    c = bn.num_features
    if conv is None:  # standalone BN: per-channel affine as a 1x1 depthwise conv
        conv = nn.Conv2d(c, c, 1, groups=c, bias=False)
        conv.weight.data.fill_(1.0)
    # skip_init: every weight is overwritten below, a random init would only cost time
    fused = skip_init(FusedConv2d, conv.in_channels, conv.out_channels, conv.kernel_size,
                      conv.stride, conv.padding, conv.dilation, conv.groups, True,
                      conv.padding_mode, device=conv.weight.device)
    with torch.no_grad():
        inv = (bn.running_var + bn.eps).rsqrt()
        gamma = bn.weight if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(inv)
        k = gamma * inv
        fused.weight.copy_(conv.weight * k.reshape(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(inv)
        fused.bias.copy_((b - bn.running_mean) * k + beta)
    return fused.to(conv.weight.device)


def as_fused_conv(conv: nn.Conv2d) -> FusedConv2d:
    if isinstance(conv, FusedConv2d):
        return conv
    fused = skip_init(FusedConv2d, conv.in_channels, conv.out_channels, conv.kernel_size,
                      conv.stride, conv.padding, conv.dilation, conv.groups,
                      conv.bias is not None, conv.padding_mode, device=conv.weight.device)
    fused.load_state_dict(conv.state_dict())
    return fused.to(conv.weight.device)


def as_fused_linear(lin: nn.Linear) -> FusedLinear:
    if isinstance(lin, FusedLinear):
        return lin
    fused = skip_init(FusedLinear, lin.in_features, lin.out_features, lin.bias is not None,
                      device=lin.weight.device)
    fused.load_state_dict(lin.state_dict())
    return fused.to(lin.weight.device)
