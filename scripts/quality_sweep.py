"""Recipe sweep behind docs/quality.md: each recipe on all ten digits, chosen on a validation
split of the training half, each recipe's held-out figure measured once.

    python scripts/quality_sweep.py --out sweep.json [--recipes base,shift2] [--seeds 0,1,2]
        [--workers 12] [--deadline-s 500]

Per (recipe, seed, digit), in its own process, `quality.evaluate_class` (the bench's own
train-and-score, with the recipe's TrainConfig and SearchConfig overrides; CUDA when present):
train on 85 % of the digit's training-half images, then score 2,000 validation digits (200 per
class from the other 15 % of the training half, never trained on) and the bench's 2,000
held-out digits (`bench --quality mnist`'s test set). A recipe is chosen by its validation
AUROC; its held-out AUROC is what docs/quality.md reports. The same z is also scored under
other distances (`distance_variants`: the residual alone, blurs at score time), which needs no
retraining. Scores are kept, and the summary's "ensembles" combines the seeds of each recipe
that has several. Results are rewritten after every task, so a run stopped at its deadline
still leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import numpy as np

# name -> (TrainConfig overrides, SearchConfig overrides). The names are those of
# docs/results/quality-sweep*.json. Each step's rows change that step's starting point,
# written out so that they stay what was measured when train's defaults move on: "base" is
# the recipe before
# the third step (sharp input, latent 100, GAN 20 epochs), "blur1.0_latent32" the one before
# the fourth (blurred input, latent 32, GAN 20 epochs); "defaults" is what `train` ships now.
BEFORE = {"input_blur": 0.0, "latent_dim": 100, "epochs": 20}
THIRD = {"input_blur": 1.0, "latent_dim": 32, "epochs": 20}
RECIPES: dict[str, tuple[dict, dict]] = {
    "defaults": ({}, {}),
    "base": (BEFORE, {}),
    "shift1": ({**BEFORE, "augment_shift": 1}, {}),
    "shift2": ({**BEFORE, "augment_shift": 2}, {}),
    "epochs40": ({**BEFORE, "epochs": 40}, {}),
    "spectral": ({**BEFORE, "d_norm": "spectral"}, {}),
    "shift2_epochs40": ({**BEFORE, "augment_shift": 2, "epochs": 40}, {}),
    "wide": ({**BEFORE, "g_width": 128, "d_width": 128}, {}),
    "polish20": (BEFORE, {"iterations": 20}),
    **{f"blur{sigma}": ({**BEFORE, "input_blur": sigma}, {}) for sigma in (0.7, 1.0, 1.5)},
    **{
        f"blur{sigma}_latent{dim}": ({**THIRD, "input_blur": sigma, "latent_dim": dim}, {})
        for sigma, dim in ((1.0, 32), (1.0, 16), (1.0, 8), (1.2, 32), (1.5, 32), (1.5, 16))
    },
    "blur1.0_spectral": ({**BEFORE, "input_blur": 1.0, "d_norm": "spectral"}, {}),
    # the fourth step. "cycle1" (a ziz term, MSE(E(G(z)), z), in the encoder's loss) was run
    # with an option that lost and was removed again (commit 65e0884).
    "encoder60": ({**THIRD, "encoder_epochs": 60}, {}),
    "gan30": ({**THIRD, "epochs": 30}, {}),
    "width96": ({**THIRD, "g_width": 96, "d_width": 96}, {}),
    **{f"polish_step{lr}": (THIRD, {"lr": lr}) for lr in (0.01, 0.03)},
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
        extra_scores=distance_variants,
    )
    out = {"recipe": recipe, "seed": seed, "digit": digit, "wall_s": time.time() - started,
           "train_cpu_min": row["train_cpu_min"], "n_train": row["n_train"],
           "variants": {}}  # fmt: skip
    n_val = len(val_idx)
    parts = (("val", val_idx, slice(None, n_val)), ("test", test_idx, slice(n_val, None)))
    for name, idx, part in parts:
        positive = labels[idx] != digit
        scores = np.asarray(row["scores"])[part]
        out[f"auroc_{name}"] = 100 * auroc(scores, positive)
        out[f"scores_{name}"] = scores.tolist()
        for vname, v in row["extra_scores"].items():
            out["variants"].setdefault(vname, {})[name] = 100 * auroc(np.asarray(v)[part], positive)
    return out


def distance_variants(x, gz, d) -> dict:
    """Scores of one z under other distances (not what `score` computes): the residual alone,
    and the contract's score taken between copies of x and G(z) blurred at score time."""
    from anogan_batch.core.model import gaussian_blur
    from anogan_batch.core.search import per_patch_losses
    from anogan_batch.core.search_config import SearchConfig

    lam = SearchConfig.lam

    def contract(a, b):
        res, disc = per_patch_losses(a, d.feature(a), b, d.feature(b))
        return res, (1 - lam) * res + lam * disc

    res, score = contract(x, gz)
    out = {"contract": score, "residual": res}
    for sigma in (0.7, 1.0, 1.5):
        res, score = contract(gaussian_blur(x, sigma), gaussian_blur(gz, sigma))
        out[f"blur{sigma}"], out[f"blur{sigma}_residual"] = score, res
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
                blur = r["variants"]["blur1.0"]
                print(f"{job}: val {r['auroc_val']:.1f} test {r['auroc_test']:.1f} "
                      f"(score-time blur 1.0: val {blur['val']:.1f}) "
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
