"""qatkit.demo.data: sklearn digits split and the Fashion-MNIST IDX loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qatkit.demo.data import (
    FASHION_MNIST_FILES,
    _read_idx,
    batches,
    load_digits,
    load_fashion_mnist,
)

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = all((FMNIST_ROOT / f).is_file() for f in FASHION_MNIST_FILES.values())
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)"
)


def test_digits_shapes_dtypes_range():
    s = load_digits()
    assert s.x_train.dtype == torch.float32 and s.x_test.dtype == torch.float32
    assert s.y_train.dtype == torch.int64 and s.y_test.dtype == torch.int64
    assert s.x_train.shape[1:] == (1, 8, 8) and s.image_shape == (1, 8, 8)
    assert len(s.x_train) + len(s.x_test) == 1797
    assert len(s.x_test) == pytest.approx(1797 * 0.25, abs=1)
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0
    # raw values 0..16 scaled by 1/16: every pixel is an exact multiple of 1/16
    assert torch.equal(s.x_train * 16, (s.x_train * 16).round())
    assert s.name == "digits" and s.classes == tuple("0123456789") and s.num_classes == 10


def test_digits_split_is_stratified():
    s = load_digits(seed=3)
    train = np.bincount(s.y_train.numpy(), minlength=10)
    test = np.bincount(s.y_test.numpy(), minlength=10)
    total = train + test
    # every class keeps its share in the test set to within one image
    assert np.all(np.abs(test - total * len(s.y_test) / total.sum()) <= 1.0)


def test_digits_deterministic_per_seed():
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_digits_split_is_a_partition():
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    expected = sorted(
        (*row, int(label))
        for row, label in zip((raw.images.reshape(-1, 64) / 16).tolist(), raw.target)
    )
    s = load_digits(seed=4)
    x = torch.cat([s.x_train, s.x_test]).flatten(1).double().tolist()
    y = torch.cat([s.y_train, s.y_test]).tolist()
    assert sorted((*row, label) for row, label in zip(x, y)) == expected


def test_digits_bad_fraction():
    with pytest.raises(ValueError):
        load_digits(test_fraction=1.0)


def test_batches_cover_every_item_once():
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.arange(10)
    got = list(batches(x, y, 4))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    shuffled = list(batches(x, y, 4, shuffle=True, seed=5))
    again = list(batches(x, y, 4, shuffle=True, seed=5))
    ys = torch.cat([b[1] for b in shuffled])
    assert sorted(ys.tolist()) == list(range(10)) and not torch.equal(ys, y)
    assert torch.equal(ys, torch.cat([b[1] for b in again]))
    for xb, yb in shuffled:
        assert torch.equal(xb[:, 0].long(), yb)  # pairs stay together
    assert [len(b[0]) for b in batches(x, y, 4, drop_last=True)] == [4, 4]


def test_fashion_mnist_missing_files_error_mentions_apt(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(root=tmp_path)
    msg = str(info.value)
    assert "apt-get install" in msg and "dataset-fashion-mnist" in msg
    assert "apt-get update" in msg and str(tmp_path) in msg


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_on_synthetic_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    for key, arr in (
        ("train_images", imgs),
        ("train_labels", labels),
        ("test_images", imgs[:3]),
        ("test_labels", labels[:3]),
    ):
        _write_idx(tmp_path / FASHION_MNIST_FILES[key], arr)
    s = load_fashion_mnist(root=tmp_path, limit_train=5)
    assert s.x_train.shape == (5, 1, 28, 28) and s.x_test.shape == (3, 1, 28, 28)
    assert torch.equal(s.x_train, torch.from_numpy(imgs[:5]).float().unsqueeze(1) / 255)
    assert torch.equal(s.y_test, torch.from_numpy(labels[:3]).long())
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(ValueError, match="unsigned-byte"):
        _read_idx(bad)


@needs_fmnist
def test_fashion_mnist_full():
    s = load_fashion_mnist()
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert s.y_train.shape == (60000,) and s.y_test.shape == (10000,)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0
    assert torch.equal(torch.bincount(s.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(s.y_test), torch.full((10,), 1000))
    assert s.name == "fashion-mnist" and len(s.classes) == 10


@needs_fmnist
def test_fashion_mnist_limits():
    s = load_fashion_mnist(limit_train=100, limit_test=50)
    assert len(s.x_train) == 100 and len(s.y_test) == 50
    assert torch.equal(s.x_train, load_fashion_mnist().x_train[:100])
