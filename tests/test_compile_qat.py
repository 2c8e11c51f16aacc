"""torch.compile of a prepared model: QAT and validation forwards are one graph, and the
compiled QAT step computes what the eager one does."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.demo.recipe import calibration_batches, centered
from qatkit.quantization.fake_quant import fake_quants
from qatkit.quantization.observers import MinMaxObserver, MovingAverageMinMaxObserver
from tests.models import BasicBlock, ResNet


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).contiguous()


def _resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1], [8, 16])  # conv, conv-bn, FloatFunctional add, linear


def _qat_model(digits, calibrate: bool = True) -> torch.nn.Module:
    """prepare(QAT qconfig), calibrated scales loaded from a calibration model, train(), QAT."""
    example = _rgb(centered(digits.x_train[:2]))
    with qk.set_march("nash-e"):
        qat = qk.prepare(_resnet(), example, qconfig=qk.default_qat_qconfig())
        if calibrate:
            calib = qk.prepare(_resnet(), example, qconfig=qk.default_calibration_qconfig())
            qk.calibrate(calib, [_rgb(b) for b in calibration_batches(digits, n=256)])
            qat.load_state_dict(calib.state_dict())
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    return qat


def _batch(digits, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    sl = slice(32 * i, 32 * (i + 1))
    return _rgb(centered(digits.x_train[sl])), digits.y_train[sl]


def _explain(model: torch.nn.Module, x: torch.Tensor):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(x)


@pytest.mark.parametrize("training,calibrate", [(True, True), (False, True), (True, False)],
                         ids=["qat", "validation", "qat-uncalibrated"])
def test_prepared_model_compiles_to_one_graph(digits, training, calibrate):
    """Uncalibrated: the activation observers still collect in every QAT step."""
    qat = _qat_model(digits, calibrate)
    x, _ = _batch(digits, 0)
    qat.train(training)  # straight after loading the calibration checkpoint
    n_fq = len(fake_quants(qat))
    assert n_fq >= 8  # weights and activations: a break each would be many graphs
    e = _explain(qat, x)
    reasons = [b.reason for b in e.break_reasons]
    assert (e.graph_count, e.graph_break_count) == (1, 0), reasons


def _step(model, opt, x, y) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("calibrate", [True, False], ids=["calibrated", "uncalibrated"])
def test_compiled_qat_steps_match_eager_and_reload(digits, calibrate):
    eager = _qat_model(digits, calibrate)
    compiled_model = copy.deepcopy(eager)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # AOTAutograd (forward and backward graphs), eager ops
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    run = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for i in range(3):
        x, y = _batch(digits, i)
        le, lc = _step(eager, opt_e, x, y), _step(run, opt_c, x, y)
        assert torch.equal(le, lc), (i, float(le), float(lc))
    # the first step makes the weight scales, which is no transition: compiled once; without
    # calibration it makes the first activation scales too, a transition: one recompile
    assert len(graphs) == (1 if calibrate else 2)
    se, sc = eager.state_dict(), compiled_model.state_dict()
    assert se.keys() == sc.keys()
    tensors = [k for k in se if isinstance(se[k], torch.Tensor)]  # and qatkit's own entry
    assert len(tensors) > 40
    for k in tensors:  # weights, scales (written inside the graph) and flags
        assert torch.equal(se[k], sc[k]), k
    assert all(bool(fq.initialized) for _, fq in fake_quants(compiled_model))
    if not calibrate:  # the observers collected in the graph (their buffers matched above)
        acts = [fq for _, fq in fake_quants(compiled_model) if not fq.is_weight and not fq.fixed]
        assert acts and all(int(fq.observer.count) > 0 for fq in acts)

    # validation of the compiled model (eval: frozen scales), then the checkpoint reloads
    compiled_model.eval()
    x, _ = _batch(digits, 5)
    with torch.no_grad():
        out = run(x)
    fresh = _qat_model(digits, calibrate=False)
    fresh.load_state_dict(sc)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    # and converts to the same integers as the eagerly trained model
    with torch.inference_mode():
        assert torch.equal(qk.convert(fresh)(x), qk.convert(eager.eval())(x))


def test_compiled_validation_without_scales_is_refused(digits):
    qat = _qat_model(digits, calibrate=False)
    qat.eval()  # QAT state under eval() validates: no activation scale was ever made
    torch._dynamo.reset()
    run = torch.compile(qat, backend="eager")
    with pytest.raises(QatkitError, match="QK008"), torch.no_grad():
        run(_batch(digits, 0)[0])


def test_buffers_filled_outside_reach_the_compiled_forward(digits):
    """Code that fills the flag buffers directly (distributed calibration merges, test helpers)
    is seen by the next eager forward and by set_fake_quantize, hence by compiled ones."""
    qat = _qat_model(digits, calibrate=False)
    x, _ = _batch(digits, 0)
    for _, fq in fake_quants(qat):
        if not fq.is_weight:
            fq.scale.fill_(1 / 64)
            fq.initialized.fill_(1)
            fq.calibrated.fill_(1)
    qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
    qat.eval()
    torch._dynamo.reset()
    run = torch.compile(qat, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(run(x), qat(x))


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_compiled_observer_counts_nonfinite_as_eager(cls):
    """Batches with inf and NaN: the graph's unconditional zeroing pass gives eager's range,
    count and non-finite count (eager runs that pass only when the range is not finite)."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * 3 for _ in range(4)]
    batches[1][0, 1, 2, 2], batches[2][3, 0, 0, 4] = float("inf"), float("nan")
    batches[2][1, 2, 3, 3] = float("-inf")
    eager, compiled = cls(), cls()
    torch._dynamo.reset()
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for b in batches:
        eager(b)
        run(b)
    assert int(eager.nonfinite) == 3
    for name, t in eager.state_dict().items():
        assert torch.equal(t, compiled.state_dict()[name]), name
    assert eager.seen and compiled.seen
