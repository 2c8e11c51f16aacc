"""A bias beyond int32 at the accumulator scale ``s_in * s_w`` (docs/fixed-point.md section 5,
"A bias beyond int32"), bit for bit against the NumPy reference.

Biases are drawn per channel from ``2^10`` to ``2^90`` accumulator units, so one layer mixes
channels whose bias fits int32 with channels far beyond (up to 2^90: beyond int64 too). A
quantized output adds the bias exactly in the requantization (one rounding); an int32 output
(high-precision, or a conv feeding an add) is shifted right by ``k = bitlen(|q_b|) - 29`` on
those channels and carries the scale ``s_acc * 2^k``. The last test takes torchvision's own
googlenet fc (random init) at the input scale its vanishing features get.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from tests import _bitexact as B
from tests._tv_import import import_torchvision
from tests.reference import npref as R

ACT = {None: None, "relu": nn.ReLU, "relu6": nn.ReLU6}


def _wide_bias(rng: np.random.Generator, s_in: float, s_w: np.ndarray) -> np.ndarray:
    """float32 biases of ``+-2^e`` accumulator units at the weight scales ``s_w``, ``e`` in
    [10, 90] per channel (the last channel always beyond int32)."""
    e = rng.uniform(10, 90, size=s_w.size)
    e[-1] = rng.uniform(32, 90)
    sign = rng.choice([-1.0, 1.0], size=s_w.size)
    return (sign * 2.0**e * np.float64(s_in) * s_w.astype(np.float64)).astype(np.float32)


def _build(layer: nn.Module, example: torch.Tensor, s_in: float, s_out: float | None,
           in_dtype: str, out_dtype: str, act: str | None) -> nn.Module:
    ops = [layer] + ([ACT[act]()] if act else [])
    hp = s_out is None
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    return B.build(B.Chain(*ops), example, scales,
                   B.qconfig(out_dtype, {"quant": in_dtype}, high_precision=hp))[1]


def _output_scale(b: np.ndarray, s_in: float, s_w: np.ndarray, q: float) -> float:
    """An output scale that leaves the largest bias ``2^q`` output steps (some saturate)."""
    return B.f32(float(np.abs(b.astype(np.float64)).max()) / 2.0**q)


def _check(c: nn.Module, got: object, want: np.ndarray, b: np.ndarray, s_in: float,
           s_w: np.ndarray, s_out: float | None, out_dtype: str, what: str) -> None:
    x = next(iter(c.ops[0]._cache.values()))  # the constants of the one input scale
    wide = any(abs(v) >= 2**31 for v in R.bias_integers(b, s_in, s_w))
    assert (x["wide"] is not None) == wide and (x["q_b"] is None) == wide, "section 5's form"
    if s_out is None:
        B.assert_ints(got, want, "qint32", R.accumulator_output_scale(b, s_in, s_w), what)
        k = R.int32_shifts(R.bias_integers(b, s_in, s_w))
        assert all((v >= 3) == (abs(q) >= 2**31)
                   for v, q in zip(k, R.bias_integers(b, s_in, s_w)))
    else:
        B.assert_ints(got, want, out_dtype, s_out, what)


modes = st.sampled_from([None, "relu", "relu6", "hp"])


@settings(max_examples=B.examples(80), deadline=None)
@given(seed=B.seeds, k=st.integers(1, 30), o=st.integers(1, 5), in_dtype=B.dtypes,
       out_dtype=B.dtypes, s_in=B.scales, mode=st.sampled_from([None, "relu", "hp"]),
       q=st.floats(-2, 16), wfill=B.wfills, xfill=B.fills)
def test_linear_wide_bias(seed: int, k: int, o: int, in_dtype: str, out_dtype: str,
                          s_in: float, mode: str | None, q: float, wfill: str, xfill: str
                          ) -> None:
    rng = np.random.default_rng(seed)
    w = B.float_weights(rng, (o, k), wfill)
    # at the scales of the nonzero channels (a zero channel's then comes from its bias)
    b = _wide_bias(rng, s_in, B.weight_scales_from_range(w, np.ones(o, dtype=np.float32)))
    s_w = B.weight_scales_from_range(w, b)
    hp, act = mode == "hp", None if mode == "hp" else mode
    s_out = None if hp else _output_scale(b, s_in, s_w, q)
    lin = nn.Linear(k, o)
    B.set_param(lin.weight, w)
    B.set_param(lin.bias, b)
    c = _build(lin, torch.randn(3, k), s_in, s_out, in_dtype, out_dtype, act)
    s_w_model = c.ops[0].weight_scale.numpy()
    assert np.array_equal(s_w_model, B.weight_scales_from_range(w, b))
    x = B.ints(rng, (3, k), in_dtype, xfill)
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(x, s_in, in_dtype)), lambda: R.linear(
        x, s_in, w, b, s_w_model, 1.0 if hp else s_out, "qint32" if hp else out_dtype,
        activation=act, mode="accumulator" if hp else "quantized"))
    if want is not None:
        _check(c, got, want, b, s_in, s_w_model, s_out, out_dtype, f"linear {mode}")


@settings(max_examples=B.examples(60), deadline=None)
@given(seed=B.seeds, cin=st.integers(1, 4), cout=st.integers(1, 4), ksize=st.integers(1, 3),
       groups=st.sampled_from([1, 2]), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       mode=modes, q=st.floats(-2, 16), wfill=B.wfills, xfill=B.fills,
       transposed=st.booleans())
def test_conv_wide_bias(seed: int, cin: int, cout: int, ksize: int, groups: int, in_dtype: str,
                        out_dtype: str, s_in: float, mode: str | None, q: float, wfill: str,
                        xfill: str, transposed: bool) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = cin * groups, cout * groups
    hp, act = mode == "hp", None if mode == "hp" else mode
    if transposed:
        layer = nn.ConvTranspose2d(cin, cout, ksize, 2, ksize // 2, 1, groups)
        w = B.float_weights(rng, layer.weight.shape, wfill, channel_axis=1)
        cin_g, cout_g = cin // groups, cout // groups
        by_out = np.stack([w[(o // cout_g) * cin_g:(o // cout_g + 1) * cin_g, o % cout_g]
                           for o in range(cout)])
        act = None  # a transposed conv has no fused activation
    else:
        layer = nn.Conv2d(cin, cout, ksize, 1, ksize // 2, groups=groups)
        w = B.float_weights(rng, layer.weight.shape, wfill)
        by_out = w
    b = _wide_bias(rng, s_in, B.weight_scales_from_range(by_out, np.ones(cout,
                                                                        dtype=np.float32)))
    s_w = B.weight_scales_from_range(by_out, b)
    s_out = None if hp else _output_scale(b, s_in, s_w, q)
    B.set_param(layer.weight, w)
    B.set_param(layer.bias, b)
    c = _build(layer, torch.randn(2, cin, 4, 5), s_in, s_out, in_dtype, out_dtype, act)
    s_w_model = c.ops[0].weight_scale.numpy()
    assert np.array_equal(s_w_model, B.weight_scales_from_range(by_out, b))
    x = B.ints(rng, (2, cin, 4, 5), in_dtype, xfill)
    out_dtype_ref = "qint32" if hp else out_dtype
    mode_ref = "accumulator" if hp else "quantized"
    if transposed:
        def reference() -> np.ndarray:
            return R.conv_transpose2d(x, s_in, w, b, s_w_model, 1.0 if hp else s_out,
                                      out_dtype_ref, 2, ksize // 2, 1, 1, groups, mode=mode_ref)
    else:
        def reference() -> np.ndarray:
            return R.conv2d(x, s_in, w, b, s_w_model, 1.0 if hp else s_out, out_dtype_ref,
                            padding=ksize // 2, groups=groups, activation=act, mode=mode_ref)
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(x, s_in, in_dtype)), reference)
    if want is not None:
        _check(c, got, want, b, s_in, s_w_model, s_out, out_dtype,
               f"{'conv_transpose2d' if transposed else 'conv2d'} {mode}")


@settings(max_examples=B.examples(40), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, b_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_b=B.scales, q=st.floats(0, 14), relu=st.booleans())
def test_conv_feeding_add_wide_bias(seed: int, in_dtype: str, b_dtype: str, out_dtype: str,
                                    s_in: float, s_b: float, q: float, relu: bool) -> None:
    """conv + add: the shifted accumulator enters the add with its scale s_acc * 2^k."""

    class ConvAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qa, self.qb, self.conv = qk.QuantStub(), qk.QuantStub(), nn.Conv2d(2, 3, 3, 1, 1)
            self.add, self.dequant = qk.FloatFunctional(), qk.DeQuantStub()
            self.relu = nn.ReLU() if relu else nn.Identity()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.relu(self.add.add(self.qb(y), self.conv(self.qa(x)))))

    rng = np.random.default_rng(seed)
    m = ConvAdd()
    w = B.float_weights(rng, m.conv.weight.shape, "random")
    s_w = B.weight_scales_from_range(w)
    b = _wide_bias(rng, s_in, s_w)
    B.set_param(m.conv.weight, w)
    B.set_param(m.conv.bias, b)
    s_out = _output_scale(b, s_in, s_w, q)
    example = (torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4))
    _, c = B.build(m, example, {"qa": s_in, "qb": s_b, "add": s_out},
                   B.qconfig(out_dtype, {"qa": in_dtype, "qb": b_dtype}))
    assert c.conv.output_mode == "accumulator"
    x, y = B.ints(rng, (1, 2, 4, 4), in_dtype, "random"), B.ints(rng, (1, 3, 4, 4), b_dtype,
                                                                  "random")
    acc = c.conv(B.qtensor(x, s_in, in_dtype))
    want_acc = R.conv2d(x, s_in, w, b, s_w, 1.0, "qint32", padding=1, mode="accumulator")
    s_acc = R.accumulator_output_scale(b, s_in, s_w)
    B.assert_ints(acc, want_acc, "qint32", s_acc, "shifted accumulator")
    got = c.relu(c.add.add(B.qtensor(y, s_b, b_dtype), acc))
    want = R.add(y, s_b, want_acc, s_acc, s_out, out_dtype, relu=relu, axis_b=1)
    B.assert_ints(got, want, out_dtype, s_out, "add of a shifted accumulator")


def test_fitting_biases_keep_the_int32_path() -> None:
    """A layer whose biases all fit takes the int32-bias paths (float64 requantization), and its
    integers equal those of the wide form of the same layer."""
    lin = nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight.uniform_(-1, 1)
        lin.bias.copy_(torch.tensor([0.5, -2.0, 3.0]))
    c = _build(lin, torch.randn(2, 8), 2.0**-6, 2.0**-4, "qint8", "qint8", None)
    x = B.qtensor(np.random.default_rng(0).integers(-128, 128, (4, 8)), 2.0**-6, "qint8")
    got = B.run_ops(c, x)
    cache = c.ops[0]._prep(x)
    assert cache["wide"] is None and cache["q_b"] is not None and cache["f64"] is not None
    from qatkit.fixed_point import kernels as fp
    plan = fp.wide_plan(cache["q_b"].double(), *cache["mn"],
                        fp.channel_bounds(c.ops[0].weight, "qint8"), "test")
    acc = torch.from_numpy(x.q.numpy().astype(np.int64)) @ c.ops[0].weight.long().t()
    again = fp.requant_wide(acc, plan, 1).clamp(-128, 127)
    assert torch.equal(again, got.q.long())


def test_torchvision_googlenet_fc_at_its_real_input_scale() -> None:
    """torchvision's googlenet (random init, weights=None): BN of weight 1 and bias 0 after
    convs of std 0.01 make the features vanish; the fc input scale from a real forward is about
    2e-13 and the fc's own biases (up to 1/32) are about 2^49 accumulator units. The fixed-point
    fc reproduces the float fc (its output is its bias) with the bias held exactly."""
    tv = import_torchvision()
    torch.manual_seed(0)
    net = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    seen: dict[str, torch.Tensor] = {}
    net.fc.register_forward_hook(lambda mod, i, o: seen.update(x=i[0], y=o))
    from skimage import data as photos
    img = torch.from_numpy(photos.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        net(((img - 0.45) / 0.225)[None])
    s_in = B.f32(float(seen["x"].abs().max()) / 127.5)
    assert s_in < 1e-9  # the vanishing features
    fc = nn.Linear(1024, 1000)
    fc.load_state_dict(net.fc.state_dict())
    s_out = B.f32(float(seen["y"].abs().max()) / 127.5)
    for hp in (False, True):
        c = _build(fc, seen["x"], s_in, None if hp else s_out, "qint8", "qint8", None)
        x = B.qtensor(R.quantize(seen["x"].numpy(), s_in, "qint8"), s_in, "qint8")
        got = B.run_ops(c, x)
        s_w = c.ops[0].weight_scale.numpy()
        b = fc.bias.detach().numpy()
        assert max(abs(v) for v in R.bias_integers(b, s_in, s_w)) > 2**47
        want = R.linear(R.quantize(seen["x"].numpy(), s_in, "qint8"), s_in,
                        fc.weight.detach().numpy(), b, s_w, 1.0 if hp else s_out,
                        "qint32" if hp else "qint8", mode="accumulator" if hp else "quantized")
        _check(c, got, want, b, s_in, s_w, None if hp else s_out, "qint8", f"googlenet fc {hp}")
        deq = c.dequant(got)
        tol = 1e-6 if hp else 0.51 * s_out
        assert (deq - seen["y"]).abs().max() <= tol, float((deq - seen["y"]).abs().max())


@pytest.mark.parametrize("hp", [False, True])
def test_qdq_export_refuses_a_wide_bias(hp: bool) -> None:
    """QDQ holds an int32 bias at s_in * s_w only (the integer flavour writes the wide form:
    tests/test_export_wide_bias.py)."""
    from qatkit.export import onnx_qdq
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.fill_(1e-6)
        lin.bias.fill_(100.0)
    c = _build(lin, torch.randn(2, 4), 2.0**-7, None if hp else 1.0, "qint8", "qint8", None)
    with pytest.raises(qk.QatkitError, match="bias beyond int32"):
        onnx_qdq.export_qdq(c, torch.full((1, 4), 0.5))


@settings(max_examples=B.examples(300), deadline=None)
@given(q_b=st.integers(-2**100, 2**100), m=st.integers(2**14, 2**15 - 1), sign=st.booleans(),
       n=st.integers(-20, 200), acc=st.lists(st.integers(-2**47 + 1, 2**47 - 1), min_size=1,
                                             max_size=6), lo_hi=st.sampled_from(
           [(-128, 127), (-32768, 32767), (-2**31, 2**31 - 1)]))
def test_requant_wide_is_requant_of_the_sum(q_b: int, m: int, sign: bool, n: int,
                                            acc: list[int], lo_hi: tuple[int, int]) -> None:
    """The int64 evaluation of section 5 equals ``sat(requant(acc + q_b, m, n))`` on Python ints
    for every shift (the ``n <= 62``, ``n >= 63`` and ``n <= 0`` forms) and any ``q_b``."""
    from qatkit.base.errors import QatkitError
    from qatkit.fixed_point import kernels as fp
    m = -m if sign else m
    bound = max(abs(a) for a in acc)
    try:
        plan = fp.wide_plan(torch.tensor([float(q_b)], dtype=torch.float64),
                            torch.tensor([m]), torch.tensor([n]), torch.tensor([bound]), "t")
    except QatkitError as e:  # only where the sum itself could leave int64 (n <= 0)
        assert n <= 0 and (bound * abs(m)) << -n >= 2**60, e
        return
    qb = int(float(q_b))  # the bias as the float64 integer the layer holds
    lo, hi = lo_hi
    got = fp.requant_wide(torch.tensor(acc, dtype=torch.int64).reshape(-1, 1), plan, 1)
    got = got.clamp(lo, hi).reshape(-1).tolist()

    def ref(v: int) -> int:
        r = (v * m + (1 << (n - 1))) >> n if n >= 1 else v * m << -n
        return min(max(r, lo), hi)

    assert got == [ref(a + qb) for a in acc]
