"""MNIST in IDX format and the one-class splits used by tests, benchmarks and the demo sample.

The project's only data is the MNIST training set (60,000 digits). Every split here is a
deterministic function of a seed, so a held-out set is the same on every machine.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

# the checkout is <root>/main/anogan_batch/evaluation/ and the data <root>/shared/data/mnist
DEFAULT_MNIST_DIR = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data", "mnist"
)


def mnist_dir() -> str:
    """$ANOGAN_MNIST_DIR, else ../shared/data/mnist beside the checkout."""
    return os.environ.get("ANOGAN_MNIST_DIR") or os.path.abspath(DEFAULT_MNIST_DIR)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def load_mnist(directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the MNIST training set."""
    d = directory or mnist_dir()
    images = _read_idx(os.path.join(d, "train-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"))
    return images, labels


def one_class_split(
    labels: np.ndarray, seed: int = 0, train_fraction: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): a per-digit `train_fraction` / rest split, seeded.

    Splitting per digit keeps every class's proportion in both halves, so the one-class
    protocol (train on digit c of `train`, test on all of `held_out`) is the same for all c.
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        idx = idx[rng.permutation(len(idx))]
        cut = round(len(idx) * train_fraction)
        train.append(idx[:cut])
        held.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
