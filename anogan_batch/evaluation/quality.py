"""`anogan-batch bench --quality mnist`: the one-class MNIST protocol of Ruff et al. (2018).

For each digit c: train the GAN (the product's own `fit_gan`, the recipe `train` ships) on the
digit-c images of our training split; score a stratified sample of the held-out split (all ten
digits, c normal, the rest anomalous) with the product's batched latent search; report AUROC
and AUPRC. The split is `datasets.one_class_split(seed=0)`: 80 % of each digit to train, 20 %
held out, from the MNIST training set (the only MNIST data this project has; the official test
set is not used, so the figures are on our own held-out split, never on data tuned on).

Writes OUT/quality.json and OUT/quality.md (a per-class table next to the published AnoGAN
numbers) and prints the table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Ruff et al. 2018, Table 1, AnoGAN on MNIST, AUROC % per class 0-9
PUBLISHED_ANOGAN = (96.6, 99.2, 85.0, 88.7, 89.4, 88.3, 94.7, 93.5, 84.9, 92.4)
PUBLISHED_DEEP_SVDD_MEAN = 94.8


@dataclass(frozen=True)
class QualityRecipe:
    """What is trained and how it is searched; the defaults are what `train` and `score`
    ship (TrainConfig() and the resolved SearchConfig()), so the table measures the product."""

    train_images: int | None = None  # per class, from the training split; None: all of them
    test_images: int = 2000  # stratified over all ten digits, from the held-out split
    seed: int = 0
    train: dict = field(default_factory=dict)  # TrainConfig fields that differ from train's
    search: dict = field(default_factory=dict)  # SearchConfig fields that differ from score's


# Extra searches on the same model, for the ablation table in docs/quality.md:
# izi_f alone (no polish) and the paper's random start with the old fast setting.
VARIANTS = {
    "izi_f": {"iterations": 0},
    "prior_gamma20": {"start": "prior", "iterations": 20},
}


def _stratified(idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per = n // 10
    picked = [rng.permutation(idx[labels[idx] == d])[:per] for d in range(10)]
    return np.sort(np.concatenate(picked))


def evaluate_class(
    digit: int,
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    recipe: QualityRecipe,
    variants: dict[str, dict] | None = None,
    *,
    keep_scores: bool = False,
    extra_scores: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train on `digit`, score the test digits; -> AUROC/AUPRC (and those of `variants`;
    with keep_scores the scores themselves too, for ensembles built afterwards).

    extra_scores(x, G(z), D) -> {name: (B,) tensor}: other scores of the main search's final
    z, kept under row["extra_scores"] (scripts/quality_sweep.py's distance variants)."""
    import torch

    from anogan_batch.core.model import model_input
    from anogan_batch.core.model_config import TrainConfig
    from anogan_batch.core.search import latent_search, resolve_search
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.core.training import fit_gan
    from anogan_batch.evaluation.evaluate import auroc, average_precision

    started = time.process_time()
    normal = train_idx[labels[train_idx] == digit][: recipe.train_images]
    cfg = TrainConfig(seed=recipe.seed, **recipe.train)
    fit = fit_gan(images[normal][:, :, :, None], "uint8", cfg, progress=False)
    g = fit.generator.to(memory_format=torch.channels_last)
    d = fit.discriminator.to(memory_format=torch.channels_last)
    e = fit.encoder.to(memory_format=torch.channels_last) if fit.encoder is not None else None
    train_cpu = time.process_time() - started
    device = torch.device(fit.device)  # scored where it trained
    g, d, e = (m.to(device) if m is not None else None for m in (g, d, e))

    x = model_input(torch.from_numpy(images[test_idx][:, :, :, None].copy()), fit.config)
    x = x.to(device)
    ids = [f"mnist-{i}" for i in test_idx]
    positive = labels[test_idx] != digit
    row: dict[str, Any] = {"digit": digit, "n_train": len(normal)}
    for name, overrides in {"": {}, **(variants or {})}.items():
        search = SearchConfig(**{"seed": recipe.seed, **recipe.search, **overrides})
        if search.start == "encoder" and e is None:
            continue  # an encoder variant of a model trained without one
        t0 = time.process_time()
        scores, residual, latents = [], [], []
        for start in range(0, len(x), 256):
            r = latent_search(g, d, x[start : start + 256], ids[start : start + 256], search, e)
            scores.append(r.anomaly_score)
            residual.append(r.residual_score)
            latents.append(torch.from_numpy(r.z))
        s, res = np.concatenate(scores), np.concatenate(residual)
        key = f"_{name}" if name else ""
        row[f"auroc{key}"] = 100 * auroc(s, positive)
        row[f"auprc{key}"] = 100 * average_precision(s, positive)
        row[f"auroc_residual_only{key}"] = 100 * auroc(res, positive)  # λ = 0 at the same z
        row[f"score_cpu_min{key}"] = (time.process_time() - t0) / 60
        if keep_scores:
            row[f"scores{key}"] = s.tolist()
        if not name:
            resolved = resolve_search(search, has_encoder=e is not None)
            row["search"] = {k: getattr(resolved, k) for k in ("start", "iterations", "lr", "lam")}
            if extra_scores is not None:
                with torch.no_grad():
                    gz = g(torch.cat(latents).to(device))
                    extra = extra_scores(x, gz, d)
                row["extra_scores"] = {
                    k: v.double().cpu().numpy().tolist() for k, v in extra.items()
                }
    row["train_cpu_min"] = train_cpu / 60
    row["cpu_min"] = row["train_cpu_min"] + row["score_cpu_min"]
    row["n_test"], row["n_anomalous"] = len(test_idx), int(positive.sum())
    return row


def run_quality(
    out: str,
    *,
    mnist: str | None = None,
    classes: tuple[int, ...] = tuple(range(10)),
    recipe: QualityRecipe | None = None,
    variants: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Run the protocol for `classes`; write OUT/quality.json and OUT/quality.md."""
    from anogan_batch.evaluation.datasets import load_mnist, one_class_split

    recipe = recipe or QualityRecipe()
    images, labels = load_mnist(mnist)
    train_idx, held = one_class_split(labels, seed=0)
    test_idx = _stratified(held, labels, recipe.test_images, seed=1)
    rows = []
    for digit in classes:
        row = evaluate_class(
            digit,
            images,
            labels,
            train_idx,
            test_idx,
            recipe,
            VARIANTS if variants is None else variants,
        )
        rows.append(row)
        print(
            f"digit {digit}: AUROC {row['auroc']:.1f}  AUPRC {row['auprc']:.1f}  "
            f"({row['cpu_min']:.1f} CPU min)",
            flush=True,
        )
    aurocs = [r["auroc"] for r in rows]
    result = {
        "protocol": "one-class MNIST (Ruff et al. 2018) on our held-out split of the "
        "MNIST training set (one_class_split seed 0, 80/20 per digit)",
        "recipe": asdict(recipe),
        "train_config": asdict(_train_config(recipe)),
        "classes": rows,
        "mean_auroc": float(np.mean(aurocs)),
        "min_auroc": float(np.min(aurocs)),
        "published_anogan": dict(enumerate(PUBLISHED_ANOGAN)),
        "published_anogan_mean": float(np.mean(PUBLISHED_ANOGAN)),
        "published_deep_svdd_mean": PUBLISHED_DEEP_SVDD_MEAN,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown_table(result)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(table)
    print(table)
    return result


def _train_config(recipe: QualityRecipe):
    from anogan_batch.core.model_config import TrainConfig

    return TrainConfig(seed=recipe.seed, **recipe.train)


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| digit | AUROC % | AUPRC % | published AnoGAN AUROC % | izi_f alone | "
        "random start, Γ = 20 | λ = 0 at the same z | CPU min |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.1f}" if key in r else "-"

    for r in result["classes"]:
        published = PUBLISHED_ANOGAN[r["digit"]]
        lines.append(
            f"| {r['digit']} | {r['auroc']:.1f} | {r['auprc']:.1f} | {published:.1f} | "
            f"{cell(r, 'auroc_izi_f')} | {cell(r, 'auroc_prior_gamma20')} | "
            f"{cell(r, 'auroc_residual_only')} | {r['cpu_min']:.1f} |"
        )
    rows = result["classes"]

    def mean(key: str) -> str:
        return f"{np.mean([r[key] for r in rows]):.1f}" if all(key in r for r in rows) else "-"

    lines.append(
        f"| mean | {result['mean_auroc']:.1f} | {mean('auprc')} | "
        f"{result['published_anogan_mean']:.1f} | {mean('auroc_izi_f')} | "
        f"{mean('auroc_prior_gamma20')} | {mean('auroc_residual_only')} | |"
    )
    return "\n".join(lines) + "\n"
