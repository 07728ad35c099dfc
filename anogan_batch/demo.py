"""`anogan-batch demo`: the whole flow on MNIST digits that ship with the package.

Task: digit 0 is normal, the nine other digits are anomalies. The bundled sample
(data/mnist_sample.npz, made by scripts/make_demo_sample.py) holds 4,000 training zeros and 300
held-out test digits (150 zeros, 150 others). The bundled model (data/model/) was trained by
this project's own `train` command: see scripts/train_demo_model.sh for the exact command.

    scans (PNG, one folder per digit) -> ingest -> [train] -> score on local Ray -> eval -> report
"""

from __future__ import annotations

import time
from importlib import resources

import numpy as np

from anogan_batch import storage

NORMAL_LABEL = "0"
PATCH_SIZE = 28
# The recipe of the bundled model (also what `demo --train` runs).
TRAIN_ARGS = {"epochs": 20, "g_width": 64, "d_width": 64, "seed": 0}


def data_path(*parts: str) -> str:
    return str(resources.files("anogan_batch").joinpath("data", *parts))


def bundled_model_dir() -> str:
    return data_path("model")


def load_sample() -> dict[str, np.ndarray]:
    with np.load(data_path("mnist_sample.npz")) as f:
        return {k: f[k] for k in f.files}


def write_sample_scans(scans: str, *, split: str) -> int:
    """Write the sample's `split` ('train' or 'test') as PNG scans in one folder per digit."""
    from anogan_batch.plots import png_bytes

    sample = load_sample()
    images, labels, index = (sample[f"{split}_{k}"] for k in ("images", "labels", "index"))
    for img, label, idx in zip(images, labels, index, strict=True):
        storage.write_bytes(storage.join(scans, str(label), f"{idx:05d}.png"), png_bytes(img))
    return len(images)


def run_demo(out: str, *, train: bool = False, iterations: int = 500) -> dict:
    """Run the demo into `out` (its sub-folders are replaced) and print where things are."""
    from anogan_batch.evaluate import evaluate_job
    from anogan_batch.ingest import IngestConfig, ingest
    from anogan_batch.pipeline import ScoreJobConfig
    from anogan_batch.report import write_report
    from anogan_batch.runner import run_score_job
    from anogan_batch.search import SearchConfig
    from anogan_batch.training import TrainConfig, train_gan

    out = storage.absolute(out)
    for sub in ("scans", "patches", "train_patches", "model", "job"):
        storage.delete(storage.join(out, sub))
    started = time.time()
    say = print

    n = write_sample_scans(storage.join(out, "scans", "test"), split="test")
    say(f"[1/5] wrote {n} test scans (digit 0 normal, 1-9 anomalous) to {out}/scans/test")
    icfg = IngestConfig(patch_size=PATCH_SIZE, label_from_parent=True)
    ingest(storage.join(out, "scans", "test"), storage.join(out, "patches"), icfg)

    if train:
        write_sample_scans(storage.join(out, "scans", "train"), split="train")
        ingest(storage.join(out, "scans", "train"), storage.join(out, "train_patches"), icfg)
        model_dir = storage.join(out, "model")
        say("[2/5] training the GAN on 4,000 normal digits ...")
        train_gan(
            storage.join(out, "train_patches"),
            model_dir,
            TrainConfig(normal_label=NORMAL_LABEL, **TRAIN_ARGS),
        )
    else:
        model_dir = bundled_model_dir()
        say(f"[2/5] using the bundled model in {model_dir} (retrain with --train)")

    say(f"[3/5] scoring {n} patches on local Ray (Γ = {iterations}) ...")
    job = storage.join(out, "job")
    manifest = run_score_job(
        ScoreJobConfig(
            model_dir=model_dir,
            patches=storage.join(out, "patches"),
            out=job,
            search=SearchConfig(iterations=iterations),
        )
    )
    say("[4/5] evaluating ...")
    metrics = evaluate_job(job, NORMAL_LABEL)
    say("[5/5] writing the report ...")
    report = write_report(job)
    minutes = (time.time() - started) / 60
    say("")
    say(f"done in {minutes:.1f} min; {manifest.patches_per_second:.1f} patches/s")
    say(f"  patch scores : {job}/patch_scores/")
    say(f"  scan scores  : {job}/scan_scores/")
    say(f"  job manifest : {job}/job.json")
    say(f"  report       : {report}")
    say(
        f"AUROC {metrics['auroc']:.4f}  AUPRC {metrics['auprc']:.4f}  "
        f"({metrics['n_normal']} normal, {metrics['n_anomalous']} anomalous)"
    )
    return metrics


if __name__ == "__main__":  # used by scripts/train_demo_model.sh
    import sys

    write_sample_scans(sys.argv[1], split=sys.argv[2])
