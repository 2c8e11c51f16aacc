"""A small segmentation-style net with four classic quantization mistakes, for `qatkit doctor`.

    qatkit doctor examples/broken.py:make_broken --processor J6E
    qatkit doctor examples/broken.py:make_fixed --processor J6E
"""

import torch
import torch.nn as nn

import qatkit as qk


class Net(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.quant = qk.QuantStub()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.add = qk.FloatFunctional()
        self.add2 = qk.FloatFunctional()
        self.cat = qk.FloatFunctional()
        self.head = nn.Conv2d(32, 4, 1)
        self.dequant = qk.DeQuantStub()
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        a = self.enc1(x)
        b = self.enc2(a)
        s = self.add.add(a, b)
        if self.fixed:
            t = self.add2.add(s, b)  # one FloatFunctional per call site
            y = self.cat.cat([s, t], 1)  # (torch.cat would do too: it becomes an operator)
        else:
            t = self.add.add(s, b)  # mistake: the same FloatFunctional called twice
            y = torch.cat([s, t.exp()], 1)  # mistake: exp has no fixed-point operator
        return self.dequant(self.head(y))


def make_broken():
    model = Net(fixed=False)
    model.qconfig = qk.default_qat_qconfig()  # mistake: the loss inherits a qconfig too
    model.head.qconfig = qk.QConfig(high_precision_output=False)  # mistake: int8 output
    return model, torch.randn(1, 3, 32, 32)


def make_fixed():
    model = Net(fixed=True)
    model.qconfig = qk.default_qat_qconfig()
    model.loss.qconfig = None
    return model, torch.randn(1, 3, 32, 32)
