"""Detection quality of a finished job: AUROC and AUPRC against the `label` column.

Positive class = anomalous = any label other than the normal one; rows without a label are left
out. Both metrics are exact (no threshold grid): AUROC is the Mann-Whitney statistic with ties
counted as one half, AUPRC is average precision (the step-wise area, as scikit-learn computes it).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import ANOMALY_SCORE, LABEL, MAX_SCORE, PATCH_ID


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over runs of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of 1-based ranks s+1 .. e
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Σ_k (R_k - R_{k-1}) P_k over distinct score thresholds, highest first."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    tp = np.cumsum(p)
    fp = np.cumsum(~p)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tie run
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(p)[last]
    fp = np.cumsum(~p)[last]
    tpr = np.r_[0.0, tp / max(1, p.sum())]
    fpr = np.r_[0.0, fp / max(1, (~p).sum())]
    return fpr, tpr


def metrics(scores: np.ndarray, labels: list[str | None], normal_label: str) -> dict[str, Any]:
    """AUROC / AUPRC / counts for labelled rows (label None is skipped)."""
    keep = np.array([lab is not None for lab in labels], dtype=bool)
    s = np.asarray(scores, dtype=np.float64)[keep]
    positive = np.array([lab != normal_label for lab in labels], dtype=bool)[keep]
    return {
        "auroc": auroc(s, positive),
        "auprc": average_precision(s, positive),
        "n_normal": int((~positive).sum()),
        "n_anomalous": int(positive.sum()),
    }


def read_truth(path: str) -> dict[str, str]:
    """patch_id -> label from a CSV or Parquet file with those two columns."""
    import pyarrow.csv as pacsv

    from anogan_batch.io.tables import read_columns

    if path.endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(storage.read_bytes(path)))
    else:
        table = read_columns(path, [PATCH_ID, LABEL])
    for col in (PATCH_ID, LABEL):
        if col not in table.column_names:
            raise InputError(f"truth file '{path}' has no column '{col}'")
    ids = table.column(PATCH_ID).to_pylist()
    return dict(zip(ids, map(str, table.column(LABEL).to_pylist()), strict=True))


def evaluate_job(out: str, normal_label: str, truth: str | None = None) -> dict[str, Any]:
    """Compute metrics of a finished job OUT and write OUT/metrics.json.

    Patch labels come from the `label` column, or from `truth` (patch_id -> label, e.g. lesion
    annotations made apart from the archive) where it has the patch. Scan-level metrics use
    `scan_scores.max_score` against the scans' labels.
    """
    from anogan_batch.io.tables import read_columns
    from anogan_batch.job.layout import JobLayout

    layout = JobLayout(out)
    patch_dir = layout.patch_scores
    table = read_columns(patch_dir, [ANOMALY_SCORE, LABEL, PATCH_ID])
    if LABEL not in table.column_names and truth is None:
        raise InputError(f"'{patch_dir}' has no 'label' column: nothing to evaluate against")
    labels = table.column(LABEL).to_pylist() if LABEL in table.column_names else []
    if truth is not None:
        known = read_truth(truth)
        ids = table.column(PATCH_ID).to_pylist()
        labels = [known.get(i, labels[k] if labels else None) for k, i in enumerate(ids)]
    result = metrics(table.column(ANOMALY_SCORE).to_numpy(), labels, normal_label)
    if result["n_normal"] == 0 or result["n_anomalous"] == 0:
        seen = sorted({lab for lab in labels if lab is not None})
        raise InputError(
            f"'{patch_dir}': need both normal (label {normal_label!r}) and anomalous rows; "
            f"found {result['n_normal']} normal and {result['n_anomalous']} anomalous "
            f"(labels present: {', '.join(seen[:10]) or 'none'})"
        )
    result["normal_label"] = normal_label
    result["truth"] = truth
    scan_dir = layout.scan_scores
    if storage.exists(scan_dir) or storage.is_dir(scan_dir):
        scans = read_columns(scan_dir, [MAX_SCORE, LABEL])
        scan_labels = scans.column(LABEL).to_pylist()
        scan_m = metrics(scans.column(MAX_SCORE).to_numpy(), scan_labels, normal_label)
        if scan_m["n_normal"] and scan_m["n_anomalous"]:
            result["scan"] = {"score": MAX_SCORE, **scan_m}
    storage.write_json(layout.metrics, result)
    return result
