"""Small real image datasets that load offline, as torch tensors.

Normalisation (the same for every loader): images are float32 ``(N, 1, H, W)`` tensors equal to
``raw / raw_max``, i.e. the raw integer pixel divided by the largest value the format can hold
(16 for sklearn digits, 255 for Fashion-MNIST). Values lie in ``[0, 1]``, with 0 (background)
mapped to exactly 0.0; no mean/std shift is applied, so a symmetric (zero point 0) input
quantizer keeps background pixels at ``q = 0``. Apply ``x * 2 - 1`` yourself if a model should
see ``[-1, 1]``. Labels are int64 tensors of class indices.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "Split",
    "batches",
    "load_digits",
    "load_fashion_mnist",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: IDX file names (as shipped by Debian's ``dataset-fashion-mnist`` and the upstream release).
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

_INSTALL_HINT = (
    "Install it with `sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` "
    "(Debian/Ubuntu; puts the gzip IDX files in /usr/share/datasets/fashion-mnist/), "
    "or pass root= pointing at a folder holding {files}."
)


@dataclass(frozen=True)
class Split:
    """A train/test split: float32 images ``(N, 1, H, W)`` in ``[0, 1]``, int64 labels ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _to_images(raw: np.ndarray, raw_max: float) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    return (x / raw_max).unsqueeze(1)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """sklearn's 1797 8x8 digits (values 0..16, scaled by 1/16), split stratified by class.

    The split depends only on ``seed`` and ``test_fraction``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    idx_train, idx_test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return Split(
        x_train=_to_images(images[idx_train], 16.0),
        y_train=torch.from_numpy(labels[idx_train]),
        x_test=_to_images(images[idx_test], 16.0),
        y_test=torch.from_numpy(labels[idx_test]),
        name="digits",
        classes=tuple(str(d) for d in range(10)),
    )


def _read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip'ed); keep at most ``limit`` items."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(
                f"{path}: not an unsigned-byte IDX file (magic {zero:#x} {dtype_code:#x})"
            )
        dims = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            dims[0] = min(dims[0], limit)
        count = int(np.prod(dims))
        buf = f.read(count)
    if len(buf) != count:
        raise ValueError(f"{path}: truncated, expected {count} bytes of data, got {len(buf)}")
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def load_fashion_mnist(
    root: str | Path = "/usr/share/datasets/fashion-mnist",
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Split:
    """Fashion-MNIST from gzip IDX files: 60000 train / 10000 test 28x28 images, scaled by 1/255.

    ``limit_train`` / ``limit_test`` keep the first N examples in file order (the files are not
    sorted by class). Raises ``FileNotFoundError`` with install instructions when files are absent.
    """
    root = Path(root)
    paths = {k: root / v for k, v in FASHION_MNIST_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). "
            + _INSTALL_HINT.format(files=", ".join(FASHION_MNIST_FILES.values()))
        )
    x_train = _read_idx(paths["train_images"], limit_train)
    y_train = _read_idx(paths["train_labels"], limit_train)
    x_test = _read_idx(paths["test_images"], limit_test)
    y_test = _read_idx(paths["test_labels"], limit_test)
    for xs, ys, part in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if xs.ndim != 3 or len(xs) != len(ys):
            raise ValueError(
                f"Fashion-MNIST {part}: images {xs.shape} do not match labels {ys.shape}"
            )
    return Split(
        x_train=_to_images(x_train, 255.0),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_to_images(x_test, 255.0),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        name="fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
    )


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_batch, y_batch)`` pairs; with ``shuffle`` the order is a permutation drawn from
    ``seed`` (same seed, same order). The last, smaller batch is kept unless ``drop_last``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} items but y has {len(y)}")
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
