"""Tests of qatkit.base.colour: RGB/BGR <-> centered YUV444 on real photos, against Pillow."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from qatkit.base import colour

# ----------------------------------------------------------------------------- fixtures


@functools.cache
def _sklearn_photos() -> dict[str, np.ndarray]:
    """china and flower, the real RGB photos shipped with scikit-learn (no downloads)."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    return {
        name.rsplit("/", 1)[-1].split(".")[0]: np.ascontiguousarray(img, dtype=np.uint8)
        for name, img in zip(sample.filenames, sample.images)
    }


def _have_skimage() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


SKLEARN = ["china", "flower"]
SKIMAGE = ["astronaut", "coffee", "chelsea", "rocket"]  # bundled with scikit-image
PHOTOS = ["china", "flower", "astronaut", "coffee"]
ALL_PHOTOS = SKLEARN + SKIMAGE


def photo(name: str) -> np.ndarray:
    if name in SKLEARN:
        img = _sklearn_photos()[name]
    else:
        data = pytest.importorskip("skimage.data")
        img = np.ascontiguousarray(getattr(data, name)(), dtype=np.uint8)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
    return img


def batch(names: list[str] = PHOTOS, size: int = 256) -> np.ndarray:
    """NHWC uint8 batch of centre crops (the scikit-image photos only where it is installed)."""
    if not _have_skimage():
        names = [n for n in names if n in SKLEARN]
    crops = []
    for n in names:
        img = photo(n)
        h0, w0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        crops.append(img[h0 : h0 + size, w0 : w0 + size])
    return np.stack(crops)


def to_chw(x: np.ndarray) -> torch.Tensor:
    """numpy HWC/NHWC -> float32 torch CHW/NCHW."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3))).float()


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.numpy(), -3, -1)


def pillow_ycbcr(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).convert("YCbCr"))


def all_rgb(chunk: int = 16):
    """Every one of the 2**24 RGB triples, in HWC chunks of chunk * 256 * 256 pixels."""
    g, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for r0 in range(0, 256, chunk):
        r = np.arange(r0, r0 + chunk)[:, None, None]
        yield np.stack(np.broadcast_arrays(r, g[None], b[None]), -1).astype(np.uint8)


# ----------------------------------------------------------------------------- formula


# Hand-computed from the integer form: (s + 128) >> 8 plus offsets, clamped, then - 128.
# (0, 0, 128) hits exact ties: 29 * 128 / 256 = 14.5 -> 15, 127 * 128 / 256 = 63.5 -> 64 and
# -21 * 128 / 256 = -10.5 -> -10 (ties round up, also for negative sums).
FULL_VECTORS = [
    ((0, 0, 0), (0, 128, 128)),
    ((255, 255, 255), (255, 128, 128)),
    ((255, 0, 0), (77, 85, 255)),
    ((0, 255, 0), (149, 44, 22)),
    ((0, 0, 255), (29, 255, 107)),
    ((0, 0, 128), (15, 192, 118)),
]
STUDIO_VECTORS = [
    ((0, 0, 0), (16, 128, 128)),
    ((255, 255, 255), (235, 128, 128)),
    ((255, 0, 0), (82, 90, 240)),
]


@pytest.mark.parametrize(("swing", "vectors"), [("full", FULL_VECTORS), ("studio", STUDIO_VECTORS)])
def test_hand_computed_vectors(swing, vectors):
    rgb = np.array([[v[0] for v in vectors]], dtype=np.uint8)  # 1 x K x 3
    want = np.array([[v[1] for v in vectors]], dtype=np.int64)
    got = colour.rgb_to_yuv444(rgb, swing=swing, centered=False)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    got_c = colour.rgb_to_yuv444(rgb, swing=swing)
    assert got_c.dtype == np.int8
    np.testing.assert_array_equal(got_c, want - 128)
    got_t = colour.rgb_to_yuv444(to_chw(rgb), swing=swing)
    assert got_t.dtype == torch.float32
    np.testing.assert_array_equal(to_hwc(got_t), want - 128)


# ----------------------------------------------------------------------------- vs Pillow


@pytest.mark.parametrize("name", PHOTOS)
def test_matches_pillow_within_one_lsb(name):
    img = photo(name)
    ours = colour.rgb_to_yuv444(img, centered=False)
    assert ours.shape == img.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - pillow_ycbcr(img).astype(np.int16))
    assert diff.max() <= 1
    # Pillow truncates where we round to nearest: many pixels differ by exactly 1, but not all.
    assert 0.05 < (diff > 0).mean() < 0.9


def test_batch_numpy_and_torch_paths_match_pillow_and_each_other():
    imgs = batch()
    ours = colour.rgb_to_yuv444(imgs, centered=False)
    assert ours.shape == imgs.shape and ours.dtype == np.uint8
    for i in range(len(imgs)):
        np.testing.assert_array_equal(ours[i], colour.rgb_to_yuv444(imgs[i], centered=False))
        diff = np.abs(ours[i].astype(np.int16) - pillow_ycbcr(imgs[i]).astype(np.int16))
        assert diff.max() <= 1

    for centered in (False, True):
        ref = colour.rgb_to_yuv444(imgs, centered=centered)
        t = colour.rgb_to_yuv444(to_chw(imgs), centered=centered)
        assert t.dtype == torch.float32 and t.shape == (len(imgs), 3, 256, 256)
        np.testing.assert_array_equal(to_hwc(t), ref.astype(np.float32))
        # torch uint8 (e.g. torchvision.io.read_image output) and numpy float paths agree too
        tu = colour.rgb_to_yuv444(to_chw(imgs).to(torch.uint8), centered=centered)
        assert tu.dtype == (torch.int8 if centered else torch.uint8)
        np.testing.assert_array_equal(to_hwc(tu), ref)
        f = colour.rgb_to_yuv444(imgs.astype(np.float64), centered=centered)
        assert f.dtype == np.float32
        np.testing.assert_array_equal(f, ref.astype(np.float32))


def test_single_chw_tensor_matches_numpy():
    img = photo("flower")
    t = colour.rgb_to_yuv444(to_chw(img))
    assert t.shape == (3, *img.shape[:2])
    np.testing.assert_array_equal(to_hwc(t), colour.rgb_to_yuv444(img).astype(np.float32))


def test_all_rgb_triples_within_two_lsb_of_pillow():
    # On photos the difference is <= 1 LSB; over every colour it reaches 2 on a few saturated
    # ones (Pillow truncates, our 8-bit coefficients deviate from BT.601 by up to 1 LSB).
    worst = 0
    for rgb in all_rgb(chunk=32):
        ours = colour.rgb_to_yuv444(rgb, centered=False).astype(np.int16)
        worst = max(
            worst,
            int(np.abs(ours - pillow_ycbcr(rgb.reshape(-1, 256, 3)).reshape(rgb.shape)).max()),
        )
    assert worst == 2


def test_close_to_exact_bt601_float_formula():
    img = batch(ALL_PHOTOS).astype(np.float64)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    exact = np.stack(
        [
            0.299 * r + 0.587 * g + 0.114 * b - 128,
            -0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 * r - 0.418688 * g - 0.081312 * b,
        ],
        -1,
    )
    err = np.abs(colour.rgb_to_yuv444(batch(ALL_PHOTOS)) - exact)
    assert err.max() < 1.7  # 0.5 rounding + up to ~1 LSB from the 8-bit coefficients
    assert err.mean() < 0.35  # round-to-nearest; flooring would give ~0.5


def test_inverse_matches_pillow_within_one_lsb_on_every_yuv_triple():
    # Pillow's YCbCr -> RGB is an independent BT.601 full-range inverse (it truncates).
    worst = 0
    for yuv in all_rgb(chunk=32):  # every (Y, U, V) triple, uncentered
        ours = colour.yuv444_to_rgb(yuv, centered=False).astype(np.int16)
        img = Image.fromarray(yuv.reshape(-1, 256, 3), mode="YCbCr")
        theirs = np.asarray(img.convert("RGB")).reshape(yuv.shape)
        worst = max(worst, int(np.abs(ours - theirs).max()))
    assert worst == 1


@pytest.mark.parametrize("swing", ["full", "studio"])
def test_inverse_matches_float64_formula(swing):
    v = np.arange(-128, 128, 3)
    yuv = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).astype(np.int8)
    y, u, w = (yuv[..., i].astype(np.float64) for i in range(3))
    y = y + 128
    if swing == "full":
        ky, k = 1.0, 1.0
    else:
        ky, k, y = 255 / 219, 255 / 224, y - 16
    exact = np.stack(
        [
            ky * y + k * 1.402 * w,
            ky * y - k * 0.344136 * u - k * 0.714136 * w,
            ky * y + k * 1.772 * u,
        ],
        -1,
    )
    want = np.clip(np.floor(exact + 0.5), 0, 255)
    got = colour.yuv444_to_rgb(yuv, swing=swing)
    # float32 evaluation may only differ right at a rounding tie
    near_tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
    assert np.all((got == want) | near_tie)
    assert (got != want).mean() < 1e-4


def test_float_input_within_tolerance_is_clamped():
    # 255.5 is accepted (float slack) and its luma (255.5 + 0.5 -> 256) is clamped to 255.
    x = torch.tensor([255.5, -0.5]).view(1, 2, 1).expand(3, 2, 1)  # grey pixels, C,H,W
    y = colour.rgb_to_yuv444(x, centered=False)
    assert y[:, 0, 0].tolist() == [255.0, 128.0, 128.0]
    assert y[:, 1, 0].tolist() == [0.0, 128.0, 128.0]
    # inverse: strong red/blue chroma overshoots [0, 255] and is clamped
    back = colour.yuv444_to_rgb(np.array([[[0, 127, 127], [0, -128, -128]]], np.int8))
    np.testing.assert_array_equal(back[0], [[255, 0, 255], [0, 255, 0]])  # all clamped


# ----------------------------------------------------------------------------- BGR


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("swing", ["full", "studio"])
def test_bgr_equals_rgb_on_reversed_channels(centered, swing):
    imgs = batch()
    bgr = np.ascontiguousarray(imgs[..., ::-1])
    want = colour.rgb_to_yuv444(imgs, swing=swing, centered=centered)
    np.testing.assert_array_equal(colour.bgr_to_yuv444(bgr, swing=swing, centered=centered), want)
    np.testing.assert_array_equal(
        colour.rgb_to_yuv444(bgr, swing=swing, centered=centered, channel_order="bgr"), want
    )
    t = colour.bgr_to_yuv444(to_chw(bgr), swing=swing, centered=centered)
    np.testing.assert_array_equal(to_hwc(t), want.astype(np.float32))
    # and reversing is not a no-op (the test can fail)
    assert not np.array_equal(colour.rgb_to_yuv444(bgr, swing=swing, centered=centered), want)
    # inverse in BGR order
    back = colour.yuv444_to_rgb(want, swing=swing, centered=centered)
    np.testing.assert_array_equal(
        colour.yuv444_to_bgr(want, swing=swing, centered=centered), back[..., ::-1]
    )


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("swing", ["full", "studio"])
def test_round_trip_every_rgb_triple_within_3_lsb(swing):
    # Measured worst case over all 2**24 triples: 3 LSB for both swings (Y and chroma are each
    # quantised to 8 bits, chroma errors are amplified up to 1.772x (full) or 2.02x (studio) in
    # B, plus the 8-bit forward coefficients and the final rounding).
    worst = 0
    hist = np.zeros(256, np.int64)
    for rgb in all_rgb():
        back = colour.yuv444_to_rgb(colour.rgb_to_yuv444(rgb, swing=swing), swing=swing)
        assert back.dtype == np.uint8
        d = np.abs(back.astype(np.int16) - rgb).max(-1)
        hist += np.bincount(d.ravel(), minlength=256)
        worst = max(worst, int(d.max()))
    assert worst == 3
    assert hist[:2].sum() / hist.sum() > 0.8  # most pixels come back within 1 LSB


@pytest.mark.parametrize("name", ALL_PHOTOS)
def test_round_trip_real_photos(name):
    img = photo(name)
    y = colour.rgb_to_yuv444(img)
    back = colour.yuv444_to_rgb(y)
    d = np.abs(back.astype(np.int16) - img)
    assert d.max() <= 3  # measured: 2 or 3 on these photos
    assert d.mean() < 0.6
    # uncentered uint8 path and float torch path give the same RGB
    np.testing.assert_array_equal(
        colour.yuv444_to_rgb(colour.rgb_to_yuv444(img, centered=False), centered=False), back
    )
    bt = colour.yuv444_to_rgb(to_chw(y.astype(np.float32)))
    assert bt.dtype == torch.float32
    np.testing.assert_array_equal(to_hwc(bt), back.astype(np.float32))


# ----------------------------------------------------------------------------- the trap


def test_studio_swing_differs_from_full_swing():
    imgs = batch(ALL_PHOTOS)
    full = colour.rgb_to_yuv444(imgs).astype(np.int16)
    studio = colour.rgb_to_yuv444(imgs, swing="studio").astype(np.int16)
    d = np.abs(full - studio)
    assert d[..., 0].max() >= 15  # luma compressed to 16..235
    assert d.mean() > 2
    # Studio-swing data fed where full swing is expected (the vendor-helper trap): colours
    # decoded by the hardware's full-swing inverse are visibly off.
    wrong = colour.yuv444_to_rgb(studio.astype(np.int8))
    err = np.abs(wrong.astype(np.int16) - imgs)
    assert err.max() >= 20
    assert err.mean() > 6  # measured 8.5
    # full swing white is 255, studio white is 235
    white = np.full((1, 1, 3), 255, np.uint8)
    assert colour.rgb_to_yuv444(white, centered=False)[0, 0, 0] == 255
    assert colour.rgb_to_yuv444(white, swing="studio", centered=False)[0, 0, 0] == 235


# ----------------------------------------------------------------------------- inputs & errors


def test_output_types_and_no_autograd():
    img = photo("china")[:16, :16]
    t = to_chw(img).requires_grad_(True)
    out = colour.rgb_to_yuv444(t)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert colour.rgb_to_yuv444(img.astype(np.int64)).dtype == np.int8
    np.testing.assert_array_equal(
        colour.rgb_to_yuv444(img.astype(np.int64)), colour.rgb_to_yuv444(img)
    )
    assert colour.rgb_to_yuv444(to_chw(img).half()).dtype == torch.float32
    y = colour.rgb_to_yuv444(img)
    assert colour.yuv444_to_rgb(y).dtype == np.uint8
    assert colour.yuv444_to_rgb(y.astype(np.float64)).dtype == np.float32
    assert colour.yuv444_to_rgb(torch.from_numpy(y).permute(2, 0, 1)).dtype == torch.uint8
    empty = np.zeros((0, 4, 4, 3), np.uint8)
    assert colour.rgb_to_yuv444(empty).shape == (0, 4, 4, 3)


def test_fractional_float_input_rounds_like_the_integer_form():
    x = torch.tensor([100.4, 100.6, 17.25]).reshape(3, 1, 1)
    s = 77 * 100.4 + 150 * 100.6 + 29 * 17.25
    assert colour.rgb_to_yuv444(x, centered=False)[0, 0, 0].item() == np.floor(s / 256 + 0.5)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((8, 8, 4), np.uint8), r"channels-last HWC or NHWC with 3 channels.*\(8, 8, 4\)"),
        (np.zeros((3, 8, 8), np.uint8), r"looks channels-first.*np\.moveaxis"),
        (np.zeros((8, 8), np.uint8), r"with 3 channels, got shape \(8, 8\)"),
        (torch.zeros(8, 8, 3), r"channels-first CHW or NCHW.*looks channels-last.*permute"),
        (torch.zeros(1, 1, 8, 8), r"channels-first CHW or NCHW with 3 channels"),
        ([[[0, 0, 0]]], r"expected a numpy array.*or a torch tensor.*got list"),
        (np.zeros((2, 2, 3), bool), r"unsupported dtype bool.*uint8"),
        (torch.zeros(3, 2, 2, dtype=torch.bool), r"unsupported dtype torch\.bool"),
        (np.full((2, 2, 3), 0.5, np.float32), r"look scaled to \[0, 1\].*multiply by 255"),
        (torch.full((3, 2, 2), 0.5), r"look scaled to \[0, 1\].*multiply by 255"),
        (torch.full((3, 2, 2), -1.5), r"must lie in \[0, 255\].*look normalized"),
        (np.full((2, 2, 3), 300.0), r"must lie in \[0, 255\], got \[300, 300\].*clamp"),
        (np.full((2, 2, 3), 256, np.int16), r"must lie in \[0, 255\], got \[256, 256\]"),
        (torch.full((3, 2, 2), float("nan")), r"must lie in \[0, 255\], got \[nan, nan\]"),
    ],
)
def test_rgb_to_yuv444_rejects_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        colour.rgb_to_yuv444(x)


def test_rejects_bad_options_and_mismatched_centering():
    img = photo("flower")[:4, :4]
    with pytest.raises(ValueError, match=r"unknown swing 'bt709'.*swing='full'.*swing='studio'"):
        colour.rgb_to_yuv444(img, swing="bt709")
    with pytest.raises(ValueError, match=r"unknown channel_order 'RGB'.*'rgb' or 'bgr'"):
        colour.rgb_to_yuv444(img, channel_order="RGB")
    with pytest.raises(ValueError, match=r"unknown swing"):
        colour.yuv444_to_rgb(colour.rgb_to_yuv444(img), swing="Full")
    with pytest.raises(ValueError, match=r"uint8 input cannot hold centered YUV.*centered=False"):
        colour.yuv444_to_rgb(colour.rgb_to_yuv444(img, centered=False))
    with pytest.raises(ValueError, match=r"int8 input looks like centered YUV.*centered=True"):
        colour.yuv444_to_rgb(colour.rgb_to_yuv444(img), centered=False)
    with pytest.raises(ValueError, match=r"must lie in \[-128, 127\] \(centered=True\)"):
        colour.yuv444_to_rgb(np.full((2, 2, 3), 200.0))
    with pytest.raises(ValueError, match=r"torch tensors must be channels-first"):
        colour.yuv444_to_rgb(torch.zeros(2, 2, 3, dtype=torch.int8))


# ----------------------------------------------------------------------------- looks_centered


def test_looks_centered_flags_rgb_and_bgr():
    x = to_chw(batch())
    for bad in (x, x / 255, x.flip(1), x - 0.5):
        ok, why = colour.looks_centered(bad)
        assert not ok
        assert "never negative" in why and "centered YUV444" in why
    ok, why = colour.looks_centered(x / 255 - 128)
    assert not ok and "never positive" in why


def test_looks_centered_flags_uncentered_yuv():
    yuv = to_chw(colour.rgb_to_yuv444(batch(), centered=False))
    ok, why = colour.looks_centered(yuv)
    assert not ok and "never negative" in why
    # chroma centered but luma left in [0, 255]
    half = yuv.clone()
    half[:, 1:] -= 128
    ok, why = colour.looks_centered(half)
    assert not ok and "channel 0 (Y)" in why


@pytest.mark.parametrize("name", ALL_PHOTOS)
def test_looks_centered_accepts_centered_yuv_of_each_photo(name):
    y = to_chw(colour.rgb_to_yuv444(photo(name)))
    assert colour.looks_centered(y) == (True, "")  # C,H,W
    assert colour.looks_centered(y[None] / 128) == (True, "")  # as scaled for the QuantStub
    assert colour.looks_centered(colour.bgr_to_yuv444(to_chw(photo(name)).flip(0))[None])[0]


def test_looks_centered_batch_and_normalized_rgb():
    y = to_chw(colour.rgb_to_yuv444(batch(ALL_PHOTOS)))
    assert colour.looks_centered(y) == (True, "")
    assert colour.looks_centered(y.numpy()) == (True, "")
    # ImageNet-normalized RGB is zero-mean, so it passes: the rule checks centering only.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = to_chw(batch(ALL_PHOTOS))
    assert colour.looks_centered((rgb / 255 - mean) / std) == (True, "")
    # a constant batch carries no evidence
    assert colour.looks_centered(torch.zeros(2, 3, 4, 4)) == (True, "")


def test_looks_centered_rejects_bad_input():
    with pytest.raises(ValueError, match=r"N,C,H,W.*got shape \(4, 4\)"):
        colour.looks_centered(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"NaN or inf"):
        colour.looks_centered(torch.full((1, 3, 2, 2), float("inf")))
    with pytest.raises(ValueError, match=r"torch tensor or numpy array.*got list"):
        colour.looks_centered([[0.0]])


# ----------------------------------------------------------------------------- properties

images = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.just(3)),
)


@settings(max_examples=200, deadline=None)
@given(img=images, swing=st.sampled_from(["full", "studio"]), order=st.sampled_from(["rgb", "bgr"]))
def test_property_range_and_float_int_paths_agree(img, swing, order):
    y = colour.rgb_to_yuv444(img, swing=swing, channel_order=order)
    assert y.dtype == np.int8 and y.shape == img.shape
    assert y.min() >= -128 and y.max() <= 127
    yt = colour.rgb_to_yuv444(to_chw(img), swing=swing, channel_order=order)
    np.testing.assert_array_equal(to_hwc(yt), y.astype(np.float32))
    yf = colour.rgb_to_yuv444(img.astype(np.float32), swing=swing, channel_order=order)
    np.testing.assert_array_equal(yf, y.astype(np.float32))
    # inverse: integer, numpy float and torch float agree, and it round-trips within 3 LSB
    back = colour.yuv444_to_rgb(y, swing=swing, channel_order=order)
    np.testing.assert_array_equal(
        to_hwc(colour.yuv444_to_rgb(yt, swing=swing, channel_order=order)),
        back.astype(np.float32),
    )
    assert np.abs(back.astype(np.int16) - img).max() <= 3


@settings(max_examples=100, deadline=None)
@given(
    img=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6), st.just(3)),
        elements=st.floats(0, 255, width=32),
    )
)
def test_property_fractional_float_numpy_and_torch_agree(img):
    assume(img.max() > 1)  # fractional data within [0, 1] is refused as "scaled to [0, 1]"
    y = colour.rgb_to_yuv444(img)
    assert y.dtype == np.float32 and y.min() >= -128 and y.max() <= 127
    assert np.array_equal(y, np.round(y))
    np.testing.assert_array_equal(to_hwc(colour.rgb_to_yuv444(to_chw(img))), y)
