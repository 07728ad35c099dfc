"""Recipe sweep behind docs/quality.md: each recipe on all ten digits, chosen on a validation
split of the training half, each recipe's held-out figure measured once.

    python scripts/quality_sweep.py --out sweep.json [--recipes base,shift2] [--seeds 0,1,2]
        [--workers 12] [--deadline-s 500]

Per (recipe, seed, digit), in its own process: train on 85 % of the digit's training-half images
(the product's fit_gan with TrainConfig overrides; CUDA when present), then score 2,000
validation digits (200 per class from the other 15 % of the training half, never trained on)
and the bench's 2,000 held-out digits (`bench --quality mnist`'s test set). A recipe is chosen
by its validation AUROC; its held-out AUROC is what docs/quality.md reports. Scores are kept,
so ensembles of seeds are built afterwards (`--ensembles`). Results are rewritten after every
task, so a run stopped at its deadline still leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import numpy as np

# name -> (TrainConfig overrides, SearchConfig overrides); "base" is today's defaults
RECIPES: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "shift1": ({"augment_shift": 1}, {}),
    "shift2": ({"augment_shift": 2}, {}),
    "epochs40": ({"epochs": 40}, {}),
    "spectral": ({"d_norm": "spectral"}, {}),
    "shift2_epochs40": ({"augment_shift": 2, "epochs": 40}, {}),
    "wide": ({"g_width": 128, "d_width": 128}, {}),
    "polish20": ({}, {"iterations": 20}),
}
VALIDATION_FRACTION = 0.15
TEST_PER_SET = 2000


def splits(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, validation test set, held-out test set) indices."""
    from anogan_batch.evaluation.datasets import one_class_split
    from anogan_batch.evaluation.quality import _stratified

    train_idx, held = one_class_split(labels, seed=0)
    rng = np.random.default_rng(2)
    fit, val = [], []
    for digit in range(10):
        idx = rng.permutation(train_idx[labels[train_idx] == digit])
        cut = round(len(idx) * VALIDATION_FRACTION)
        val.append(idx[:cut])
        fit.append(idx[cut:])
    fit_idx, val_pool = np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))
    return (
        fit_idx,
        _stratified(val_pool, labels, TEST_PER_SET, seed=1),
        _stratified(held, labels, TEST_PER_SET, seed=1),
    )


def task(recipe: str, seed: int, digit: int, mnist: str | None, smoke: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    from anogan_batch.evaluation.datasets import load_mnist
    from anogan_batch.evaluation.evaluate import auroc
    from anogan_batch.evaluation.quality import QualityRecipe, evaluate_class

    images, labels = load_mnist(mnist)
    fit_idx, val_idx, test_idx = splits(labels)
    train, search = RECIPES[recipe]
    if smoke:  # a check of the script itself, not a measurement
        train = {**train, "epochs": 1, "encoder_epochs": 1}
    started = time.time()
    row = evaluate_class(
        digit,
        images,
        labels,
        fit_idx,
        np.concatenate([val_idx, test_idx]),
        QualityRecipe(seed=seed, train=train, search=search),
        variants={},
        keep_scores=True,
    )
    scores = np.asarray(row["scores"])
    out = {"recipe": recipe, "seed": seed, "digit": digit, "wall_s": time.time() - started}
    for name, idx, part in (("val", val_idx, scores[: len(val_idx)]),
                            ("test", test_idx, scores[len(val_idx) :])):  # fmt: skip
        out[f"auroc_{name}"] = 100 * auroc(part, labels[idx] != digit)
        out[f"scores_{name}"] = part.tolist()
    out["train_cpu_min"], out["n_train"] = row["train_cpu_min"], row["n_train"]
    return out


def ensembles(results: list[dict], labels_val, labels_test) -> dict:
    """Mean of per-model rank-normalised scores over the seeds of each recipe that has several."""
    from anogan_batch.evaluation.evaluate import auroc

    def ranks(s):
        return np.argsort(np.argsort(s)) / (len(s) - 1)

    out = {}
    for recipe in sorted({r["recipe"] for r in results}):
        for digit in range(10):
            rows = [r for r in results if r["recipe"] == recipe and r["digit"] == digit]
            if len(rows) < 2:
                continue
            for name, lab in (("val", labels_val), ("test", labels_test)):
                mean = np.mean([ranks(np.asarray(r[f"scores_{name}"])) for r in rows], axis=0)
                key = f"{recipe}_x{len(rows)}"
                out.setdefault(key, {}).setdefault(name, {})[digit] = 100 * auroc(
                    mean, lab != digit
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra-seeds", default="", help="recipe:1,2 pairs run after the rest")
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=1e9)
    ap.add_argument("--mnist", default=None)
    ap.add_argument("--smoke", action="store_true", help="1 epoch each: checks the script only")
    args = ap.parse_args()

    from anogan_batch.evaluation.datasets import load_mnist

    digits = [int(d) for d in args.digits.split(",")]
    jobs = [(r, int(s), d) for s in args.seeds.split(",") for r in args.recipes.split(",")
            for d in digits]  # fmt: skip
    for pair in filter(None, args.extra_seeds.split(";")):
        recipe, seeds = pair.split(":")
        jobs += [(recipe, int(s), d) for s in seeds.split(",") for d in digits]
    _, labels = load_mnist(args.mnist)
    _, val_idx, test_idx = splits(labels)
    started, results = time.time(), []
    import multiprocessing as mp

    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(task, *job, args.mnist, args.smoke): job for job in jobs}
        while pending:
            left = args.deadline_s - (time.time() - started)
            if left <= 0:  # what finished is written; running workers are left behind
                print(f"deadline: {len(pending)} tasks not finished", flush=True)
                os._exit(0)
            done, _ = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for f in done:
                job = pending.pop(f)
                try:
                    results.append(f.result())
                except Exception as e:  # report, keep the rest
                    print(f"{job}: {type(e).__name__}: {e}", flush=True)
                    continue
                r = results[-1]
                print(f"{job}: val {r['auroc_val']:.1f} test {r['auroc_test']:.1f} "
                      f"({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
            summary = {
                "elapsed_s": time.time() - started,
                "results": results,
                "ensembles": ensembles(results, labels[val_idx], labels[test_idx]),
            }
            with open(args.out, "w") as fh:
                json.dump(summary, fh)


if __name__ == "__main__":
    main()
