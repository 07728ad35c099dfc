"""A region-read scan's work: its foreground mask at low resolution, its patch grid, the grid
cut into work units, and a unit cut into patches band by band.

- The mask is computed on an overview: the coarsest native level whose short side is still at
  least MASK_SHORT_SIDE pixels, or, when no level that small fits one read (a single-level
  file), level 0 sampled every k-th pixel, read band by band. Never level 0 whole. A tile that
  cannot be decoded is background there (its patches are quarantined when they are cut).
- The grid is the output resolution's (io/readers' grid: the last patch flush with the
  border); a patch is kept when its share of foreground reaches --min-foreground.
- A unit is up to UNIT_PATCHES patches of consecutive grid rows (row-major), so one 150,000-
  patch slide spreads over every worker; it is retried whole, and its rows are its own.
- A unit is cut band by band: each grid row's kept patches are read as runs of neighbours
  whose region fits the read budget, downsampled by area when the resolution asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from anogan_batch.ingest.levels import Resolution, area_downsample
from anogan_batch.ingest.masks import MASK_SHORT_SIDE
from anogan_batch.ingest.sources import Source

UNIT_PATCHES = 4_096  # patches of one work unit, at most


class Row(NamedTuple):
    y: int  # output pixels
    xs: np.ndarray  # int64, output pixels: the kept patches' left edges


class Grid(NamedTuple):
    """A scan's patch grid at its output resolution."""

    height: int  # output pixels
    width: int
    rows: list[Row]  # rows with at least one kept patch
    kept: int
    skipped: int  # below --min-foreground


def grid_positions(length: int, patch: int, step: int) -> list[int]:
    """Top-left offsets along one axis; the last patch sits flush with the border, so every
    pixel is covered (heatmaps need full coverage)."""
    positions = list(range(0, length - patch + 1, step))
    if positions and positions[-1] != length - patch:
        positions.append(length - patch)
    return positions


def cut_patches(pixels: np.ndarray, patch: int, step: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (x, y, patch (P, P, C)) over the grid of a (H, W, C) image in memory."""
    h, w = pixels.shape[:2]
    for y in grid_positions(h, patch, step):
        for x in grid_positions(w, patch, step):
            yield x, y, pixels[y : y + patch, x : x + patch]


def output_size(source: Source, res: Resolution) -> tuple[int, int]:
    lv = source.levels[res.level]
    return max(1, math.floor(lv.height / res.factor)), max(1, math.floor(lv.width / res.factor))


def overview(source: Source) -> tuple[np.ndarray, float]:
    """(values (h, w, C), level-0 pixels per overview pixel): the scan at low resolution."""
    fits = [
        k for k, lv in enumerate(source.levels)
        if min(lv.height, lv.width) >= MASK_SHORT_SIDE
        and lv.height * lv.width * source.channels <= source.budget
    ]  # fmt: skip
    if fits:
        k = max(fits, key=lambda i: source.levels[i].downsample)
        lv = source.levels[k]
        return source.read_region(0, 0, lv.width, lv.height, k, tolerant=True), lv.downsample
    # level 0 (or the smallest level) sampled every `step` pixels, a band of rows at a time
    k = max(range(len(source.levels)), key=lambda i: source.levels[i].downsample)
    lv = source.levels[k]
    step = max(1, min(lv.height, lv.width) // MASK_SHORT_SIDE)
    band = max(step, (source.budget // max(1, lv.width * source.channels)) // step * step)
    parts = []
    for top in range(0, lv.height, band):
        rows = min(band, lv.height - top)
        values = source.read_region(0, round(top * lv.downsample), lv.width, rows, k,
                                    tolerant=True)  # fmt: skip
        parts.append(values[::step, ::step])
    return np.concatenate(parts), lv.downsample * step


def patch_grid(
    source: Source,
    res: Resolution,
    patch: int,
    step: int,
    foreground: np.ndarray | None,
    scale: float,
    min_foreground: float,
) -> Grid:
    """The kept patches of a scan read at `res`. `foreground`: its mask (bool (h, w)) at
    `scale` level-0 pixels a pixel, or None to keep every patch."""
    height, width = output_size(source, res)
    if height < patch or width < patch:
        raise ValueError(f"image is {height}x{width} at the chosen resolution, smaller than "
                         f"the {patch}px patch")  # fmt: skip
    ys = np.asarray(grid_positions(height, patch, step), np.int64)
    xs = np.asarray(grid_positions(width, patch, step), np.int64)
    if foreground is None:
        return Grid(height, width, [Row(int(y), xs) for y in ys], len(ys) * len(xs), 0)
    share = _foreground_share(foreground, ys, xs, patch, res.downsample / scale)
    keep = share >= min_foreground  # (rows, columns)
    rows = [Row(int(y), xs[keep[i]]) for i, y in enumerate(ys) if keep[i].any()]
    return Grid(height, width, rows, int(keep.sum()), int(keep.size - keep.sum()))


def _foreground_share(mask: np.ndarray, ys, xs, patch: int, ratio: float) -> np.ndarray:
    """(len(ys), len(xs)): the foreground share of each patch, from the mask's integral
    image; `ratio`: mask pixels per output pixel."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def edges(starts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(starts * ratio).astype(np.int64), 0, limit - 1)
        hi = np.clip(np.ceil((starts + patch) * ratio).astype(np.int64), lo + 1, limit)
        return lo, hi

    y0, y1 = edges(ys, mask.shape[0])
    x0, x1 = edges(xs, mask.shape[1])
    total = (integral[y1[:, None], x1[None, :]] - integral[y0[:, None], x1[None, :]]
             - integral[y1[:, None], x0[None, :]] + integral[y0[:, None], x0[None, :]])  # fmt: skip
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / area


def units(grid: Grid, max_patches: int | None = None) -> list[list[Row]]:
    """The grid's rows in work units of at most `max_patches` (UNIT_PATCHES) patches (a row
    longer than that is split), in row-major order."""
    max_patches = max_patches or UNIT_PATCHES
    out: list[list[Row]] = []
    current: list[Row] = []
    count = 0
    for row in grid.rows:
        for lo in range(0, len(row.xs), max_patches):
            piece = Row(row.y, row.xs[lo : lo + max_patches])
            if current and count + len(piece.xs) > max_patches:
                out.append(current)
                current, count = [], 0
            current.append(piece)
            count += len(piece.xs)
    if current:
        out.append(current)
    return out


def cut_rows(
    source: Source, res: Resolution, rows: list[Row], patch: int
) -> Iterator[tuple[int, int, np.ndarray | Exception]]:
    """(x, y, values (P, P, C)) of each kept patch of `rows`, x and y in output pixels; a patch
    whose region cannot be decoded (or is over the read budget) yields the ValueError in place
    of its values. A fault of the storage is raised: it is never a patch's own."""
    for row in rows:
        for run in _runs(row.xs, patch, _widest(source, res, patch)):
            try:
                band = _read_band(source, res, row.y, int(run[0]), int(run[-1]) + patch, patch)
            except ValueError:  # undecodable, or over the read budget: patch by patch, then
                yield from _one_by_one(source, res, row.y, run, patch)
                continue
            for x in run:
                left = int(x - run[0])
                yield int(x), row.y, band[:, left : left + patch]


def _one_by_one(source: Source, res: Resolution, y: int, run: np.ndarray, patch: int):
    """The patches of a band whose read failed, each read alone: only those that touch the
    unreadable part fail."""
    for x in run:
        try:
            yield int(x), y, _read_band(source, res, y, int(x), int(x) + patch, patch)
        except ValueError as e:  # this patch's region of the file (a storage fault propagates)
            yield int(x), y, e


def _widest(source: Source, res: Resolution, patch: int) -> int:
    """The widest band, in output pixels, whose level region fits the read budget."""
    tall = math.ceil(patch * res.factor) + 1
    return max(patch, int(source.budget // (tall * source.channels) / res.factor) - 1)


def _runs(xs: np.ndarray, patch: int, widest: int) -> Iterator[np.ndarray]:
    """`xs` in runs of patches that touch or overlap and span at most `widest` pixels."""
    start = 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or xs[i] > xs[i - 1] + patch or xs[i] + patch - xs[start] > widest:
            yield xs[start:i]
            start = i


def _read_band(source: Source, res: Resolution, y: int, x0: int, x1: int, patch: int):
    """Output pixels [y, y + patch) x [x0, x1) of the scan at `res`."""
    ds = source.levels[res.level].downsample
    if res.factor == 1.0:
        return source.read_region(round(x0 * ds), round(y * ds), x1 - x0, patch, res.level)
    lx0, ly0 = math.floor(x0 * res.factor), math.floor(y * res.factor)
    lx1, ly1 = math.ceil(x1 * res.factor), math.ceil((y + patch) * res.factor)
    region = source.read_region(round(lx0 * ds), round(ly0 * ds), lx1 - lx0, ly1 - ly0, res.level)
    return area_downsample(region, patch, x1 - x0)
