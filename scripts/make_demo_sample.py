"""Rebuild anogan_batch/data/mnist_sample.npz, the demo's bundled data, from ../shared/data/mnist.

    python scripts/make_demo_sample.py [--mnist DIR]

The sample: 4,000 training images of the normal digit (0) from the training half of a seeded
80/20 per-digit split, and from the held-out half: 300 test images (150 zeros, 150 of the other
nine digits), for the demo's mosaic scans 400 more zeros (the tissue) and 40 other digits (the
lesions), and 500 more zeros that the bundled model's calibration is made of (never trained
on, never in a scan). Deterministic: rerunning writes the same arrays.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from anogan_batch.evaluation.datasets import load_mnist, one_class_split

NORMAL_DIGIT = 0
N_TRAIN, N_TEST_NORMAL, N_TEST_ANOMALOUS = 4000, 150, 150
N_TILES, N_LESIONS, N_CALIBRATION = 400, 40, 500
OUT = os.path.join(os.path.dirname(__file__), "..", "anogan_batch", "data", "mnist_sample.npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mnist", default=None, help="folder with the MNIST IDX files")
    args = parser.parse_args()
    images, labels = load_mnist(args.mnist)
    train, held_out = one_class_split(labels, seed=0)
    rng = np.random.default_rng(2017)
    train_normal = train[labels[train] == NORMAL_DIGIT][:N_TRAIN]
    test_normal = rng.choice(held_out[labels[held_out] == NORMAL_DIGIT], N_TEST_NORMAL, False)
    test_anomalous = rng.choice(held_out[labels[held_out] != NORMAL_DIGIT], N_TEST_ANOMALOUS, False)
    test = np.sort(np.concatenate([test_normal, test_anomalous]))
    rest = np.setdiff1d(held_out, test)
    tiles = rng.choice(rest[labels[rest] == NORMAL_DIGIT], N_TILES, replace=False)
    lesions = rng.choice(rest[labels[rest] != NORMAL_DIGIT], N_LESIONS, replace=False)
    rest = np.setdiff1d(rest, tiles)
    calibration = np.sort(rng.choice(rest[labels[rest] == NORMAL_DIGIT], N_CALIBRATION, False))
    np.savez_compressed(
        OUT,
        train_images=images[train_normal],
        train_labels=labels[train_normal],
        train_index=train_normal.astype(np.int32),
        test_images=images[test],
        test_labels=labels[test],
        test_index=test.astype(np.int32),
        tile_images=images[tiles],
        lesion_images=images[lesions],
        lesion_labels=labels[lesions],
        calibration_images=images[calibration],
        calibration_labels=labels[calibration],
        calibration_index=calibration.astype(np.int32),
        normal_digit=np.int32(NORMAL_DIGIT),
    )
    print(
        f"wrote {OUT}: {len(train_normal)} train, {len(test)} test ({os.path.getsize(OUT)} bytes)"
    )


if __name__ == "__main__":
    main()
