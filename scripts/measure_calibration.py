"""Measure the calibrated decisions on the one-class MNIST protocol (docs/calibration.md).

    python scripts/measure_calibration.py [--digits 0-9] [--epochs 5] [--width 32] [--out DIR]
    python scripts/measure_calibration.py --table DIR/calibration.json   # the tables again

For each digit c: train on the normal digits of our own 80 % split (`train`'s calibration
holds 10 % of them out, default), score the held-out 20 % (c normal, 2,000 other digits
anomalous) with score's default search, and report the false-positive rate on held-out normal
digits at α = 0.01, 0.05, 0.1 (with its 95 % Wilson interval) and the true-positive rate.
Scan level: mosaics like the demo's (16 patches; half the scans hold 1-2 anomalous tiles)
drawn from the held-out patches' p-values, the scan p-value (Bonferroni), Benjamini-Hochberg
at Q over 200 scans, 200 times: the observed FDR against Q. A patch's score depends on its
pixels only, so a mosaic's p-values are its tiles'.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

ALPHAS = (0.01, 0.05, 0.1)
QS = (0.05, 0.1, 0.2)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def conformal_range(n: int, m: int, alpha: float, draws: int = 200_000) -> tuple[float, float]:
    """95 % range of the FPR observed on m normal patches with a calibration of n, when the
    p-values are exactly as valid as conformal ones are: given the calibration set, a normal
    patch has p <= alpha with probability Beta(k, n + 1 - k), k = floor(alpha (n + 1)) (the
    calibration's own luck), then the m test patches add binomial noise. The Wilson interval
    covers only the second part."""
    k = int(np.floor(alpha * (n + 1)))
    if k == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(0)
    rate = rng.binomial(m, rng.beta(k, n + 1 - k, draws)) / m
    return float(np.quantile(rate, 0.025)), float(np.quantile(rate, 0.975))


def markdown(rows: list[dict]) -> str:
    """The tables of docs/calibration.md from the measured rows."""
    lines = [
        "| digit | n cal | n normal | "
        + " | ".join(f"FPR@{a} (Wilson 95 %) [conformal 95 % range] | TPR@{a}" for a in ALPHAS)
        + " |"
    ]
    lines.append("|---" * (3 + 2 * len(ALPHAS)) + "|")
    for r in rows:
        cells = [str(r["digit"]), str(r["n_calibration"]), str(r["n_normal"])]
        for a in ALPHAS:
            lo, hi = r[f"fpr@{a}_ci"]
            clo, chi = conformal_range(r["n_calibration"], r["n_normal"], a)
            cells.append(f"{r[f'fpr@{a}']:.4f} ({lo:.4f}-{hi:.4f}) [{clo:.4f}-{chi:.4f}]")
            cells.append(f"{r[f'tpr@{a}']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = [
        "all",
        str(sum(r["n_calibration"] for r in rows)),
        str(sum(r["n_normal"] for r in rows)),
    ]
    for a in ALPHAS:
        k = sum(round(r[f"fpr@{a}"] * r["n_normal"]) for r in rows)
        m = sum(r["n_normal"] for r in rows)
        lo, hi = wilson(k, m)
        cells.append(f"{k / m:.4f} ({lo:.4f}-{hi:.4f})")
        cells.append(f"{np.mean([r[f'tpr@{a}'] for r in rows]):.3f}")
    lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| digit | " + " | ".join(f"FDR at Q={q} (power)" for q in QS) + " |",
        "|---" * (1 + len(QS)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['digit']} | "
            + " | ".join(
                f"{s['fdr']:.3f} ± {s['fdr_se']:.3f} ({s['power']:.2f})" for s in r["scan"]
            )
            + " |"
        )
    return "\n".join(lines)  # fmt: skip


def mosaic_fdr(p_normal, p_anomal, q, rng, scans=200, reps=200, tiles=16) -> dict:
    """Observed FDR and power of BH over mosaic scans built from patch p-values."""
    from anogan_batch.core.calibration import benjamini_hochberg

    fdp, power = [], []
    for _ in range(reps):
        sick = np.arange(scans) >= scans // 2
        p_scan = np.empty(scans)
        for s in range(scans):
            p = rng.choice(p_normal, tiles)
            if sick[s]:
                k = 1 + s % 2
                p[:k] = rng.choice(p_anomal, k)
            p_scan[s] = min(1.0, tiles * p.min())  # Bonferroni, as scan_scores.p_value
        flags, _ = benjamini_hochberg(p_scan, q)
        fdp.append((flags & ~sick).sum() / max(1, flags.sum()))
        power.append((flags & sick).sum() / sick.sum())
    return {"q": q, "fdr": float(np.mean(fdp)), "fdr_se": float(np.std(fdp) / np.sqrt(reps)),
            "power": float(np.mean(power))}  # fmt: skip


def one_digit(digit: int, images, labels, args, root: str) -> dict:
    from anogan_batch.api import Detector
    from anogan_batch.core.calibration import conformal_p_values
    from anogan_batch.core.model_config import TrainConfig
    from anogan_batch.core.training import train_gan
    from anogan_batch.evaluation.datasets import one_class_split
    from anogan_batch.io.tables import write_patch_table

    train_idx, held_idx = one_class_split(labels, seed=0)
    normal_train = train_idx[labels[train_idx] == digit]
    table = os.path.join(root, f"train-{digit}")
    ids = [f"mnist-{i:05d}" for i in normal_train]
    write_patch_table(table, images[normal_train], ids=ids, scan_ids=ids, files=4)
    cfg = TrainConfig(epochs=args.epochs, g_width=args.width, d_width=args.width,
                      encoder_epochs=args.epochs, seed=0)  # fmt: skip
    model = os.path.join(root, f"model-{digit}")
    t0 = time.time()
    train_gan(table, model, cfg, progress=False)
    train_s = time.time() - t0

    det = Detector.load(model)
    cal = det.calibration()
    rng = np.random.default_rng(digit)
    normal = held_idx[labels[held_idx] == digit]
    others = rng.choice(held_idx[labels[held_idx] != digit], args.anomalies, replace=False)
    t0 = time.time()
    p_n = conformal_p_values(det.score(images[normal]).anomaly_score, cal)
    p_a = conformal_p_values(det.score(images[others]).anomaly_score, cal)
    score_s = time.time() - t0
    row = {
        "digit": digit,
        "n_calibration": len(cal),
        "n_normal": len(p_n),
        "n_anomalous": len(p_a),
        "train_s": round(train_s, 1),
        "score_s": round(score_s, 1),
    }
    for alpha in ALPHAS:
        k = int((p_n <= alpha).sum())
        lo, hi = wilson(k, len(p_n))
        row[f"fpr@{alpha}"] = round(k / len(p_n), 4)
        row[f"fpr@{alpha}_ci"] = [round(lo, 4), round(hi, 4)]
        row[f"tpr@{alpha}"] = round(float(np.mean(p_a <= alpha)), 4)
    row["scan"] = [mosaic_fdr(p_n, p_a, q, np.random.default_rng(100 + digit)) for q in QS]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", default="0-9")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--anomalies", type=int, default=2000)
    ap.add_argument("--out", default="/tmp/calibration-measure")
    ap.add_argument("--table", help="print the tables of a calibration.json and stop")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)["rows"]))
        return
    lo, _, hi = args.digits.partition("-")
    digits = range(int(lo), int(hi or lo) + 1)

    from anogan_batch.evaluation.datasets import load_mnist

    images, labels = load_mnist()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for digit in digits:
        rows.append(one_digit(digit, images, labels, args, args.out))
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "calibration.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
