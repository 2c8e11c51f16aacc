"""QAT forms of the operators: float arithmetic with fake quantization of weights and outputs.

``prepare`` swaps float modules for these. Each owns the fake quants that convert will read:
``weight_fake_quant`` (per output channel) and ``activation_post_process`` (the output; absent
for a high-precision output or a conv that feeds a fused add).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.fused import ACTIVATIONS, FusedConv2d, FusedLinear
from qatkit.quantization.qconfig import QConfig

OUTPUT_MODES = ("quantized", "high_precision", "accumulator")


class _QATWeighted:
    """Shared set-up of conv/linear QAT modules."""

    _qatkit_leaf = True
    activation: str | None = None
    output_mode = "quantized"
    weight_fake_quant: FakeQuantize
    activation_post_process: FakeQuantize | None

    def _setup(self, qconfig: QConfig, pow2: bool, output_mode: str) -> None:
        assert output_mode in OUTPUT_MODES
        self.qconfig = qconfig
        self.output_mode = output_mode
        self.weight_fake_quant = FakeQuantize(qconfig.weight, pow2, is_weight=True)
        wfq = self.weight_fake_quant
        if wfq.ch_axis == 0:  # sized now: a buffer resized in the first step would recompile
            n_out = self._weight_oc_first().shape[0] if hasattr(self, "_weight_oc_first") \
                else self.weight.shape[0]
            wfq.scale = torch.ones(n_out, device=self.weight.device)
        self.activation_post_process = (
            FakeQuantize(qconfig.activation, pow2) if output_mode == "quantized" else None)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        y = ACTIVATIONS[self.activation](y)
        app = self.activation_post_process
        return y if app is None else app(y)


class QATConv2d(_QATWeighted, FusedConv2d):
    @classmethod
    def from_float(cls, mod: nn.Conv2d, qconfig: QConfig, pow2: bool, output_mode: str
                   ) -> QATConv2d:
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                  mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode)
        new.load_state_dict(mod.state_dict())
        new.activation = getattr(mod, "activation", None)
        new.feeds_add = getattr(mod, "feeds_add", False)
        new.user_type = getattr(mod, "user_type", None)  # a folded standalone BN
        new._setup(qconfig, pow2, output_mode)
        return new.to(mod.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias))


class QATLinear(_QATWeighted, FusedLinear):
    @classmethod
    def from_float(cls, mod: nn.Linear, qconfig: QConfig, pow2: bool, output_mode: str
                   ) -> QATLinear:
        new = cls(mod.in_features, mod.out_features, mod.bias is not None)
        new.load_state_dict(mod.state_dict())
        new.activation = getattr(mod, "activation", None)
        new._setup(qconfig, pow2, output_mode)
        return new.to(mod.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(x, self.weight_fake_quant(self.weight), self.bias))


class QATConvTranspose2d(_QATWeighted, nn.ConvTranspose2d):
    @classmethod
    def from_float(cls, mod: nn.ConvTranspose2d, qconfig: QConfig, pow2: bool,
                   output_mode: str) -> QATConvTranspose2d:
        if mod.padding_mode != "zeros":
            from qatkit.base.errors import fail
            raise fail("QK106", "ConvTranspose2d supports only padding_mode='zeros'.")
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                  mod.output_padding, mod.groups, mod.bias is not None, mod.dilation)
        new.load_state_dict(mod.state_dict())
        new._setup(qconfig, pow2, output_mode)
        # The stored weight is [Cin, Cout/groups, kh, kw]; quantize per output channel.
        return new.to(mod.weight.device)

    def _weight_oc_first(self) -> torch.Tensor:
        w = self.weight
        g = self.groups
        cin, cog = w.shape[0], w.shape[1]
        # -> [Cout, Cin/g, kh, kw] so that axis 0 is the output channel
        return w.reshape(g, cin // g, cog, *w.shape[2:]).transpose(1, 2).reshape(
            g * cog, cin // g, *w.shape[2:])

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        w = self.weight_fake_quant(self._weight_oc_first())
        g = self.groups
        cout, cig = w.shape[0], w.shape[1]
        w = w.reshape(g, cout // g, cig, *w.shape[2:]).transpose(1, 2).reshape(self.weight.shape)
        y = F.conv_transpose2d(x, w, self.bias, self.stride, self.padding, self.output_padding,
                               self.groups, self.dilation)
        return self._finish(y)


class QATOp(nn.Module):
    """A float op whose output gets its own fake quant: ReLU6, Hardtanh, pooling, bilinear
    resizing and the lookup-table nonlinearities."""

    _qatkit_leaf = True

    def __init__(self, op: nn.Module, qconfig: QConfig, pow2: bool) -> None:
        super().__init__()
        self.op = op
        self.qconfig = qconfig
        self.activation_post_process = FakeQuantize(qconfig.activation, pow2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_post_process(self.op(x))
