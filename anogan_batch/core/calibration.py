"""Calibrated decisions from normal data alone: conformal p-values, scan p-values, FDR control.

A calibration is the anomaly scores of n normal patches the model never trained on, scored by
one search (its parameters are the key: a p-value from another search would be meaningless).
For a new patch with score s,

    p = (1 + #{calibration scores >= s}) / (n + 1)

is the conformal p-value: when the patch is normal (exchangeable with the calibration
patches), P(p <= α) <= α for every α, whatever the model (Vovk et al. 2005; Bates et al. 2023).
So flagging patches with p <= α keeps the false-positive rate on normal patches at most α.

A scan's patches overlap and share anatomy, so they are not independent. The scan's p-value
is Bonferroni's, min(1, m · min_i p_i) over its m scored patches: valid under any dependence
between them (Simes' would be smaller but needs positive dependence). Across scans,
Benjamini-Hochberg at level Q flags scans so that the expected share of normal scans among the
flagged is at most Q (conformal p-values are positively dependent through the shared
calibration set, under which BH keeps its guarantee: Bates et al. 2023). docs/calibration.md
has the measured error rates.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anogan_batch.core.search_config import SearchConfig

MIN_CALIBRATION = 20  # below this, the smallest p-value 1/(n+1) is too coarse to decide with


def search_key(search: SearchConfig) -> str:
    """Identity of a (resolved) search: its parameters that change scores (SCORE_FIELDS,
    under the config's own names), hashed."""
    from anogan_batch.core.search_config import key_fields

    text = json.dumps(key_fields(search), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def conformal_p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """p-value of each score against the calibration scores; NaN where a score is NaN."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = len(cal) - np.searchsorted(cal, s, side="left")  # #{cal >= s}
    p = (1.0 + at_least) / (len(cal) + 1.0)
    return np.where(np.isnan(s), np.nan, p)


def score_threshold(calibration: np.ndarray, alpha: float) -> float | None:
    """The anomaly score above which a patch gets p <= alpha (None: no score can): with k the
    most calibration scores a flagged patch may be at or below, the (n-k)-th smallest."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    k = int(np.floor(alpha * (len(cal) + 1) + 1e-9)) - 1
    return None if k < 0 else float(cal[len(cal) - k - 1])


def bonferroni(p_values: np.ndarray) -> float:
    """A scan's p-value from its patches' (NaN ignored): min(1, m · min p); NaN if none."""
    p = np.asarray(p_values, dtype=np.float64)
    p = p[~np.isnan(p)]
    return float(min(1.0, len(p) * p.min())) if len(p) else float("nan")


def benjamini_hochberg(p_values: np.ndarray, q: float) -> tuple[np.ndarray, float]:
    """(flagged, threshold): BH at level q over the p-values (NaN never flagged); the threshold
    is the largest p-value flagged (0 when none is)."""
    p = np.asarray(p_values, dtype=np.float64)
    valid = ~np.isnan(p)
    m = int(valid.sum())
    ordered = np.sort(p[valid])
    passing = np.flatnonzero(ordered <= q * np.arange(1, m + 1) / max(m, 1))
    threshold = float(ordered[passing[-1]]) if len(passing) else 0.0
    return bh_flags(p, threshold), threshold


def bh_flags(p_values: np.ndarray, threshold: float) -> np.ndarray:
    """Which p-values `benjamini_hochberg`'s threshold flags (NaN never): for applying a
    threshold found over all of a job's scans to one batch of them at a time."""
    p = np.asarray(p_values, dtype=np.float64)
    return ~np.isnan(p) & (np.nan_to_num(p, nan=2.0) <= threshold) & (threshold > 0)


def drift(counts: np.ndarray, alpha: float = 0.05) -> dict[str, Any]:
    """How far a job's patch p-values are from Uniform(0, 1), what normal data gives, from
    `counts[k]`: the patches whose p-value is (k + 1) / (n + 1) (a job's p-values take only
    these n + 1 values, so the counts are exact and their memory is the calibration's). The
    share at or below `alpha` (expected: at most alpha) and the Kolmogorov-Smirnov distance to
    the uniform distribution: a scanner change or a wrong model moves both, without labels."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {"n": 0}
    support = np.arange(1, len(counts) + 1) / len(counts)  # the p-values, (k + 1) / (n + 1)
    ecdf = np.cumsum(counts) / total
    below = np.concatenate([[0.0], ecdf[:-1]])  # the ECDF just left of each support point
    ks = float(max(np.max(np.abs(ecdf - support)), np.max(np.abs(below - support))))
    share = float(counts[support <= alpha].sum() / total)
    bound = alpha + 2.576 * np.sqrt(alpha * (1 - alpha) / total)  # binomial 99 % upper bound
    return {
        "n": int(total),
        "alpha": alpha,
        "share_p_le_alpha": round(share, 5),
        "expected_at_most": alpha,
        "upper_99": round(float(bound), 5),
        "excess": bool(share > bound),
        "ks_uniform": round(ks, 5),
    }


def p_value_counts(p_values: np.ndarray, n_calibration: int) -> np.ndarray:
    """counts[k] of the p-values equal to (k + 1) / (n + 1) (NaN left out), for `drift`."""
    p = np.asarray(p_values, dtype=np.float64)
    p = p[~np.isnan(p)]
    k = np.rint(p * (n_calibration + 1)).astype(np.int64) - 1
    return np.bincount(np.clip(k, 0, n_calibration), minlength=n_calibration + 1)


def split_by_scan(scan_ids: list[str], fraction: float, seed: int = 0) -> np.ndarray:
    """True for the patches of the scans held out for calibration: about `fraction` of the
    scans, chosen by a hash of (seed, scan_id), so that a scan's patches stay together and
    the split is the same on every machine."""

    def draw(scan_id: str) -> float:
        digest = hashlib.sha256(f"{seed}\x00{scan_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    unique = {s: draw(s) < fraction for s in set(scan_ids)}
    return np.array([unique[s] for s in scan_ids], dtype=bool)


# ---- the overlay's colour scale, anchored in the model's normal residuals -----------------

# An overlay colours a heat-grid cell whose smoothed heat exceeds HEAT_QUANTILES[0] of the
# normal calibration patches' cells, and shows it at full colour from HEAT_QUANTILES[1]: one
# normal cell in 2,000 is tinted, one in 20,000 fully coloured, for every model (lower
# quantiles left normal tissue's specks a large share of the colour: docs/calibration.md).
HEAT_QUANTILES = (0.9995, 0.99995)
HEAT_PATCHES = 2_000  # calibration patches whose cells the quantiles are taken over, at most


def heat_radius(patch_size: int) -> int:
    """The box blur radius, in pixels, an overlay smooths residuals with: stroke-wide
    misalignments of one pixel are not lesions."""
    return max(1, patch_size // 7)


def heat_cell(patch_size: int) -> int:
    """The side, in pixels, of one cell of a heat grid: the largest divisor of the patch side
    up to a 1/8 of it, so that a patch holds a whole number of cells (at most 8 x 8 of them
    for a side with such a divisor) and a scan's grid is 1/cell of its size a side."""
    top = max(1, patch_size // 8)
    return max(d for d in range(1, top + 1) if patch_size % d == 0)


def heat_blur_cells(patch_size: int) -> int:
    """`heat_radius` in cells of `heat_cell`: the blur the overlay applies to a heat grid."""
    return max(1, round(heat_radius(patch_size) / heat_cell(patch_size)))


def cell_means(maps: np.ndarray, cell: int) -> np.ndarray:
    """Residual maps (B, C, S, S) -> their channel-mean residual per cell, (B, S/cell, S/cell)
    float32: what a heat grid holds of a patch."""
    b, c, s, _ = maps.shape
    g = s // cell
    # (B, C, g, cell, g, cell): summed over the cell's pixels, then over the channels
    return maps.reshape(b, c, g, cell, g, cell).sum(axis=(3, 5), dtype=np.float32).mean(
        axis=1
    ) / np.float32(cell * cell)


def box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edges replicated), separable via cumulative sums."""
    for axis in (0, 1):
        pad = [(radius + 1, radius) if i == axis else (0, 0) for i in range(2)]
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
        n = c.shape[axis]
        a = c.take(range(2 * radius + 1, n), axis) - c.take(range(n - 2 * radius - 1), axis)
        a = a / (2 * radius + 1)
    return a


def normal_heat(maps: list[np.ndarray], patch_size: int) -> dict[str, Any]:
    """The overlay scale of a calibration: HEAT_QUANTILES of the heat an overlay shows over
    normal patches (`maps`: (N, C, S, S) float32 arrays): their cells' channel-mean residual
    (`cell_means`), smoothed by `heat_blur_cells`, as a scan's heat grid is."""
    cell, radius = heat_cell(patch_size), heat_blur_cells(patch_size)
    patches = np.concatenate([np.asarray(m) for m in maps])[:HEAT_PATCHES]
    cells = cell_means(patches, cell)
    values = np.concatenate([box_blur(g, radius).ravel() for g in cells])
    floor, full = (float(v) for v in np.quantile(values, HEAT_QUANTILES))
    return {"quantiles": list(HEAT_QUANTILES), "floor": floor, "full": max(full, floor * 1.01),
            "cell": cell, "radius": radius, "patches": len(patches)}  # fmt: skip
