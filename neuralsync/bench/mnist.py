"""MNIST for the seed benchmarks: the original IDX files read with numpy, and the seed's MLP.

The data directory is found without a flag (:func:`data_dir`): ``$NEURALSYNC_DATA`` when set,
else ``../shared/data`` beside the repository root. The four files are the original gzip'd IDX
files (``train-images-idx3-ubyte.gz`` ...), parsed here with numpy (no torchvision).
"""

from __future__ import annotations

import gzip
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["MNIST_FILES", "Mnist", "data_dir", "load_mnist", "mnist_mlp", "read_idx"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_dir(required: tuple[str, ...] = ()) -> Path:
    """The shared data directory: ``$NEURALSYNC_DATA``, else ``../shared/data`` beside the
    repository root; a clear error when it, or one of the ``required`` entries, is missing.

    >>> try:
    ...     data_dir(("no-such-file",))
    ... except FileNotFoundError as error:
    ...     print("lacks no-such-file" in str(error) or "does not exist" in str(error))
    True

    """
    env = os.environ.get("NEURALSYNC_DATA")
    if env:
        root, origin = Path(env), "$NEURALSYNC_DATA"
    else:
        repository = Path(__file__).resolve().parents[2]
        root, origin = repository.parent / "shared" / "data", "../shared/data beside the repository"
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} ({origin}) does not exist: expected the shared data "
            "(mnist/ with the IDX gzip files, tinyshakespeare.txt); set NEURALSYNC_DATA to it"
        )
    missing = [name for name in required if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"data directory {root} ({origin}) lacks {', '.join(missing)}")
    return root


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzip'd when its name ends in ``.gz``) as a numpy array of its shape.

    The format: two zero bytes, a type code, the number of dimensions, one big-endian uint32
    per dimension, then the values.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (header {raw[:4].hex()}, expected 0000tt nn)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of {dtype}), "
            f"the file holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass
class Mnist:
    """Flattened images scaled to [0, 1] (float32) and int64 labels: train, validation, test."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        validation: int,
    ) -> Mnist:
        """Split the last ``validation`` training rows off as the validation set."""
        if images.shape[0] != labels.shape[0] or test_images.shape[0] != test_labels.shape[0]:
            raise ValueError(
                f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}, "
                f"{test_images.shape[0]} vs {test_labels.shape[0]}"
            )
        if not 0 < validation < images.shape[0]:
            raise ValueError(f"validation: expected 0 < n < {images.shape[0]}, got {validation}")

        def x(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a.reshape(a.shape[0], -1).astype(np.float32) / 255.0)

        def y(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a.astype(np.int64))

        cut = images.shape[0] - validation
        return cls(
            x(images[:cut]), y(labels[:cut]), x(images[cut:]), y(labels[cut:]),
            x(test_images), y(test_labels),
        )  # fmt: skip


def load_mnist(root: Path | None = None, validation: int = 5000) -> Mnist:
    """The MNIST files under ``root/mnist`` (default :func:`data_dir`), the last
    ``validation`` training images held out for selection."""
    folder = (root if root is not None else data_dir(("mnist",))) / "mnist"
    arrays = {}
    for key, name in MNIST_FILES.items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: expected the original MNIST IDX file")
        arrays[key] = read_idx(path)
    return Mnist.from_arrays(
        arrays["train_images"], arrays["train_labels"], arrays["test_images"],
        arrays["test_labels"], validation,
    )  # fmt: skip


def mnist_mlp(sizes: tuple[int, ...] = (784, 128, 64, 10)) -> nn.Sequential:
    """The seed's MLP, 784-128-64-10 with ReLU.

    >>> sum(p.numel() for p in mnist_mlp().parameters())
    109386

    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
