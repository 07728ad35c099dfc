"""Foreground masks: which pixels of a scan are tissue (or object), for --min-foreground.

Computed at low resolution, never from a slide's full level: on a scan in memory, every
stride-th pixel (MASK_SHORT_SIDE); on a slide, its overview (ingest/plan.overview).

- colour (RGB, e.g. H&E slides): saturated pixels, since stained tissue is coloured and glass
  or background is white or grey, whatever their brightness: Otsu on the saturation after a
  3x3 median, SATURATION_FLOOR where Otsu has no two classes (all glass, or all tissue);
- grayscale (CT, X-ray, inspection images): brighter than the intensity's Otsu threshold.

Then a 3x3 closing fills pinholes and a 3x3 opening drops specks; every other component is
kept, not only the largest.
"""

from __future__ import annotations

import numpy as np


def otsu_threshold(gray: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(gray, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


# The foreground mask is computed on every stride-th pixel, the stride keeping the short side
# at least MASK_SHORT_SIDE pixels (at most MASK_MAX_STRIDE): a slide's mask never needs its
# full resolution, and the patches it decides on are far larger than a stride.
MASK_SHORT_SIDE, MASK_MAX_STRIDE = 500, 64
# Saturation of stained tissue under a brightfield microscope is about 0.1-0.6, of glass and
# background under 0.05: the threshold where Otsu has no two classes to split (docs/schema.md)
SATURATION_FLOOR = 0.07


def foreground_mask(stored: np.ndarray) -> np.ndarray:
    """(H, W) bool: the scan's foreground, which `--min-foreground` keeps patches for (the
    module's docstring). Computed
    on a strided copy (MASK_SHORT_SIDE) and scaled back."""
    from anogan_batch.fields import PIXEL_MAX

    h, w, c = stored.shape
    stride = max(1, min(MASK_MAX_STRIDE, min(h, w) // MASK_SHORT_SIDE))
    small = stored[::stride, ::stride].astype(np.float32) / PIXEL_MAX.get(stored.dtype.name, 1.0)
    mask = _saturation_mask(small[..., :3]) if c >= 3 else _intensity_mask(small.mean(axis=2))
    mask = _close(mask)
    return np.repeat(np.repeat(mask, stride, axis=0), stride, axis=1)[:h, :w]


def _intensity_mask(gray: np.ndarray) -> np.ndarray:
    if float(gray.max()) - float(gray.min()) < 1e-6:  # flat scan: no foreground at all
        return np.zeros(gray.shape, dtype=bool)
    return gray > otsu_threshold(gray)


def _saturation_mask(rgb: np.ndarray) -> np.ndarray:
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = _median3(np.divide(high - low, high, out=np.zeros_like(high), where=high > 0))
    threshold = SATURATION_FLOOR
    if float(saturation.max()) - float(saturation.min()) > 1e-6:
        otsu = otsu_threshold(np.clip(saturation, 0.0, 1.0))
        below = saturation[saturation <= otsu]
        # two real classes: glass below the floor, tissue above it
        if otsu > SATURATION_FLOOR and (below.size == 0 or below.mean() < SATURATION_FLOOR):
            threshold = otsu
    return saturation > threshold


def _median3(values: np.ndarray) -> np.ndarray:
    padded = np.pad(values, 1, mode="edge")
    h, w = values.shape
    shifted = [padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return np.median(np.stack(shifted), axis=0)


def _neighbourhood(m: np.ndarray, reduce) -> np.ndarray:
    """`reduce` over each pixel's 3x3 neighbourhood, borders continued outwards."""
    padded = np.pad(m, 1, mode="edge")
    h, w = m.shape
    return reduce([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)])


def _dilate(m: np.ndarray) -> np.ndarray:
    return _neighbourhood(m, lambda views: np.logical_or.reduce(views))


def _erode(m: np.ndarray) -> np.ndarray:
    return _neighbourhood(m, lambda views: np.logical_and.reduce(views))


def _close(mask: np.ndarray) -> np.ndarray:
    """A 3x3 closing (pinholes filled), then a 3x3 opening (specks narrower than three mask
    pixels dropped: dust, pen dots, single saturated pixels); every larger component stays."""
    closed = _erode(_dilate(mask))
    return _dilate(_erode(closed))
