"""A scan read by region (a slide): its plan (resolution, mask, grid, work units) and its
units cut into patch rows. job/ingest.py runs these, locally or on Ray Data.

Patch rows carry level-0 `x`, `y` (the patch covers `downsample` level-0 pixels per pixel),
the `level` read and the `mpp` read. A run of patches whose read fails is reported with its
reason and the rest of the scan is cut (`Failed`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from anogan_batch.ingest import levels, plan
from anogan_batch.ingest.masks import foreground_mask
from anogan_batch.ingest.sources import Source, TiffSource, open_tiff
from anogan_batch.io.columns import (
    CHANNELS,
    DTYPE,
    HEIGHT,
    IMAGE,
    LABEL,
    LEVEL,
    MPP,
    PATCH_ID,
    SCAN_ID,
    SLICE,
    WIDTH,
    X,
    Y,
)
from anogan_batch.io.readers import Image, ReadOptions, to_stored

# formats a region read is tried for (a stack of pages falls back to io/readers)
REGION_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi")


@dataclass(frozen=True)
class RegionParams:
    patch: int
    step: int
    min_foreground: float = 0.0
    mpp: float | None = None
    level: int | None = None
    options: ReadOptions = field(default_factory=ReadOptions)


class Failed(NamedTuple):
    x: int  # level-0
    y: int
    reason: str


@dataclass
class RegionPlan:
    """A region scan's plan: what its scan row says, and its work units."""

    resolution: levels.Resolution
    grid: plan.Grid
    units: list[list[plan.Row]]
    normalisation: dict
    stored_dtype: str
    source: dict[str, Any]  # Source.describe()


def open_source(fh, budget: int) -> TiffSource | None:
    """A seekable file as a region source; None when it is not one (a stack of pages)."""
    return open_tiff(fh, budget)


def plan_scan(
    source: Source, params: RegionParams, user_mask: np.ndarray | None = None
) -> RegionPlan:
    """Resolution, mask (at low resolution; `user_mask`: the user's, any size, nonzero =
    foreground), grid and units of one scan."""
    res = levels.choose(source, params.mpp, params.level)
    view, scale = plan.overview(source)
    stored, norm = to_stored(Image("", view), params.options)
    mask = None
    if user_mask is not None:
        mask = resize_mask(user_mask, stored.shape[0], stored.shape[1])
    elif params.min_foreground > 0:
        mask = foreground_mask(stored)
    grid = plan.patch_grid(source, res, params.patch, params.step, mask, scale,
                           params.min_foreground)  # fmt: skip
    return RegionPlan(res, grid, plan.units(grid), norm, stored.dtype.name, source.describe())


def cut_unit(
    source: Source,
    res: levels.Resolution,
    rows: list[plan.Row],
    params: RegionParams,
    scan_id: str,
    label: str | None,
) -> Iterator[dict | Failed]:
    """A unit's patch rows (io/patches.INGEST_SCHEMA) in row-major order, or a Failed for each
    patch of a region that could not be read or stored."""
    from anogan_batch.io.patches import encode_pixels, patch_id_for

    p = params.patch
    for x, y, values in plan.cut_rows(source, res, rows, p):
        x0, y0 = round(x * res.downsample), round(y * res.downsample)
        if isinstance(values, Exception):
            yield Failed(x0, y0, f"region unreadable: {_one_line(values)}")
            continue
        try:
            pixels, _ = to_stored(Image("", values), params.options)
        except ValueError as e:
            yield Failed(x0, y0, _one_line(e))
            continue
        yield {
            PATCH_ID: patch_id_for(scan_id, x0, y0, p),
            SCAN_ID: scan_id,
            X: x0,
            Y: y0,
            SLICE: None,
            IMAGE: encode_pixels(pixels),
            HEIGHT: p,
            WIDTH: p,
            CHANNELS: pixels.shape[2],
            DTYPE: pixels.dtype.name,
            LABEL: label,
            LEVEL: res.level,
            MPP: res.mpp,
        }


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A user's mask (2-D or with channels; nonzero = foreground) at height x width, by
    nearest neighbour."""
    flat = mask if mask.ndim == 2 else mask.max(axis=2)
    rows = (np.arange(height) * flat.shape[0] // height).clip(0, flat.shape[0] - 1)
    cols = (np.arange(width) * flat.shape[1] // width).clip(0, flat.shape[1] - 1)
    return flat[rows][:, cols] != 0


def rows_to_json(rows: list[plan.Row]) -> str:
    return json.dumps([[r.y, r.xs.tolist()] for r in rows])


def rows_from_json(text: str) -> list[plan.Row]:
    return [plan.Row(int(y), np.asarray(xs, np.int64)) for y, xs in json.loads(text)]


@functools.lru_cache(maxsize=4)
def cached_source(path: str, budget: int) -> Source:
    """One open source per file and process: a worker's units of one slide share its handle
    and its tile cache."""
    from anogan_batch.io import storage

    fh = storage.open_input(path)
    source = open_source(fh, budget)
    if source is None:
        raise ValueError("file is no longer a single-image TIFF")
    return source


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
