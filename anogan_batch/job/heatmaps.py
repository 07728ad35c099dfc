"""Per-scan anomaly heatmaps: heat grids stitched from the cells each scored patch carries.

A heat grid has one cell per `cell` x `cell` pixels of the scan (core/calibration.heat_cell:
up to 1/8 of the patch side, so a patch holds a whole number of cells). The scorer writes, with
each patch's scores, its `heat` (the channel-mean residual per cell, float16) and its `thumb`
(its pixels averaged per cell, uint8): a few hundred bytes a patch, so the per-scan groupby of
aggregate.py moves those and never the residual maps or the input table's pixels again. Cells
where patches overlap hold the mean of their patches' cells; cells no scored patch covers
(masked background, quarantined patches) are 0. A patch whose position is not a multiple of the
cell lands on the nearest cell.

A scan whose grid would pass MAX_GRID_CELLS (a gigapixel slide) gets a coarser grid: `cell`
grows by a whole factor until it fits, so a heatmap and its overlay never need memory in
proportion to the scan's pixels, only to the grid's.

The overlay PNG (OUT/overlays/, named by `layout.file_stem(scan_id)`) is the thumbnail grid in
gray with the heat on top ("hot" colours), enlarged by whole pixels towards the scan's size up
to MAX_OVERLAY_PIXELS. For display only, the heat is smoothed by a box blur
(core/calibration.heat_blur_cells) and mapped onto the colour scale from the model's
calibration: tinted above the 99th percentile of its normal patches' smoothed cell heat, full
colour from the 99.9th (core/calibration.normal_heat), so normal tissue stays dark and one scale
holds for every scan and job of the model. A model without that record gets the fixed scale
[HEAT_FLOOR, HEAT_SCALE]; either way, never a per-scan scale.

OUT/heatmaps/ is a Parquet table, one row per scan: the scan_scores columns plus height, width
(the scan's, in level-0 pixels), cell (level-0 pixels per grid cell a side: a slide read at
--mpp has patches of more than one level-0 pixel a pixel), grid_height, grid_width, heatmap
(float32 little-endian bytes, row-major grid_height x grid_width), max_heat, mean_heat, overlay
(path of the PNG) and heatmap_skipped (why a scan has no heatmap, else null).
`heatmap_for(OUT, scan_id)` fetches one scan's grid, reading only the row groups whose scan_id
statistics can match.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from anogan_batch.core.calibration import box_blur, heat_blur_cells, heat_cell
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    CELL,
    GRID_HEIGHT,
    GRID_WIDTH,
    HEAT_SLICE,
    HEATMAP,
    HEATMAP_SKIPPED,
    HEIGHT,
    MAX_HEAT,
    MEAN_HEAT,
    OVERLAY,
    SCAN_ID,
    WIDTH,
)

# The fixed scale of a model whose calibration has no `heat` record (model space spans 0..2):
HEAT_FLOOR = 0.1  # smoothed residual per cell below which nothing is drawn
HEAT_SCALE = 0.35  # smoothed residual shown at full colour
# Most cells a scan's grid holds (a float64 sum and a count each while stitching): a larger
# scan gets coarser cells.
MAX_GRID_CELLS = 2**22
# Most pixels an overlay PNG holds: a grid smaller than this is enlarged by whole pixels.
MAX_OVERLAY_PIXELS = 2**22
# Patches stitched at a time: bounds the index arrays of a scan with millions of patches.
STITCH_CHUNK = 16_384


class HeatmapGeometry(NamedTuple):
    """What a job's patches look like: the model's patch side and channels."""

    size: int
    channels: int
    heat: tuple[float, float] = (HEAT_FLOOR, HEAT_SCALE)  # the overlay's (tinted, full colour)


class ScanSize(NamedTuple):
    """A scan's size as ingest recorded it: level-0 pixels, and the level-0 pixels per pixel
    it was read at (a slide read at --mpp; 1 otherwise)."""

    height: int
    width: int
    downsample: float = 1.0


class Cells(NamedTuple):
    """A scan's scored patches as the grid sees them."""

    x: np.ndarray  # (N,) int64 top-left pixel
    y: np.ndarray  # (N,) int64
    heat: np.ndarray  # (N, G, G) float16 or float32, G = patch side / cell
    thumb: np.ndarray | None  # (N, G, G, C) uint8 (0..255); None without thumbnails


def patch_cells(maps: np.ndarray, size: int) -> np.ndarray:
    """Residual maps (B, C, S, S) float32 -> `heat` values: (B, G * G) float16 each, the
    channel mean per cell (core/calibration.cell_means, by torch: 5x numpy's speed here)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(maps)
    if x.shape[1] > 1:
        x = x.mean(dim=1, keepdim=True)
    cell = heat_cell(size)
    cells = F.avg_pool2d(x, cell).to(torch.float16)  # (B, 1, G, G)
    return cells.reshape(len(maps), (size // cell) ** 2).numpy()


def patch_thumbs(pixels: np.ndarray, size: int, full_scale: float) -> np.ndarray:
    """Stored pixels (B, S, S, C) -> `thumb` values: (B, G * G * C) uint8, the pixels' mean
    per cell on 0..255 (`full_scale`: the stored dtype's full scale)."""
    import torch

    cell = heat_cell(size)
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    b, s, _, c = x.shape
    g = s // cell
    # summed over a cell's columns, then its rows: two contiguous reductions
    sums = x.reshape(b, s, g, cell, c).sum(dim=3, dtype=torch.float32)
    sums = sums.reshape(b, g, cell, g, c).sum(dim=2)
    shade = sums.mul_(255.0 / (full_scale * cell * cell)).round_().clamp_(0, 255)
    return shade.to(torch.uint8).reshape(b, g * g * c).numpy()


def grid_shape(height: int, width: int, cell: int) -> tuple[int, int, int]:
    """(grid height, grid width, cell) for a height x width scan: `cell` grown by a whole
    factor until the grid holds at most MAX_GRID_CELLS."""

    def cells(factor: int) -> int:
        return math.ceil(height / (cell * factor)) * math.ceil(width / (cell * factor))

    factor = max(1, math.isqrt(cells(1) // MAX_GRID_CELLS))
    while cells(factor) > MAX_GRID_CELLS:
        factor += 1
    step = cell * factor
    return math.ceil(height / step), math.ceil(width / step), step


def stitch_cells(
    cells: Cells, size: int, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """A scan's patch cells -> (heat grid (gh, gw) float32, thumbnail grid (gh, gw, C) float32
    in [0, 1] or None): the mean of the patch cells that fall in each grid cell, 0 where none
    does. `shape`: grid_shape's (gh, gw, grid cell in pixels)."""
    gh, gw, step = shape
    cell = heat_cell(size)
    g = size // cell
    sums = np.zeros(gh * gw, np.float64)
    counts = np.zeros(gh * gw, np.float64)
    channels = cells.thumb.shape[3] if cells.thumb is not None else 0
    shades = np.zeros((channels, gh * gw), np.float64)
    offsets = np.arange(g) * cell
    for lo in range(0, len(cells.x), STITCH_CHUNK):
        x, y = cells.x[lo : lo + STITCH_CHUNK], cells.y[lo : lo + STITCH_CHUNK]
        # the pixel each patch cell starts at (nearest cell), then the grid cell it lands in
        cx = ((x[:, None] + cell // 2) // cell * cell + offsets) // step  # (n, G)
        cy = ((y[:, None] + cell // 2) // cell * cell + offsets) // step
        inside = (cy[:, :, None] < gh) & (cx[:, None, :] < gw)  # (n, G, G); x, y >= 0
        index = (cy[:, :, None] * gw + cx[:, None, :])[inside]
        part = cells.heat[lo : lo + STITCH_CHUNK][inside].astype(np.float64)
        sums += np.bincount(index, part, gh * gw)
        counts += np.bincount(index, minlength=gh * gw)
        for k in range(channels):
            part = cells.thumb[lo : lo + STITCH_CHUNK, :, :, k][inside].astype(np.float64)
            shades[k] += np.bincount(index, part, gh * gw)
    seen = np.maximum(counts, 1)
    heat = (sums / seen).reshape(gh, gw).astype(np.float32)
    if not channels:
        return heat, None
    thumb = (shades / seen / 255.0).T.reshape(gh, gw, channels).astype(np.float32)
    return heat, thumb


def colorize(
    scan: np.ndarray,
    heat: np.ndarray,
    radius: int = 0,
    scale: tuple[float, float] = (HEAT_FLOOR, HEAT_SCALE),
) -> np.ndarray:
    """Scan in [0, 1] (H, W, C) and heat (H, W) -> RGB uint8 overlay; `scale`: the smoothed
    heat from which a pixel is tinted, and from which it is at full colour."""
    # float32 throughout: a gigapixel slide's grid has millions of cells
    gray = scan.mean(axis=2, dtype=np.float32) if scan.shape[2] != 3 else None
    base = np.repeat(gray[:, :, None], 3, axis=2) if gray is not None else scan
    shown = (box_blur(heat, radius) if radius else heat).astype(np.float32)
    floor, full = scale
    t = np.clip((shown - np.float32(floor)) / np.float32(full - floor), 0, 1)[:, :, None]
    del shown
    hot = np.concatenate(
        [np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], 2
    )
    alpha = np.clip(1.5 * t, 0, 0.85)
    blended = base * (1 - alpha)
    blended += hot * alpha
    return np.rint(blended * 255).astype(np.uint8)


def enlarge(image: np.ndarray, step: int) -> np.ndarray:
    """An overlay (gh, gw, 3) enlarged by whole pixels: towards `step` (one grid cell's
    pixels) a side, within MAX_OVERLAY_PIXELS."""
    gh, gw = image.shape[:2]
    k = max(1, min(step, math.isqrt(MAX_OVERLAY_PIXELS // max(1, gh * gw))))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image


def canvas_size(cells: Cells, size: int, recorded: ScanSize | None) -> tuple[int, int]:
    """(height, width) of a scan in pixels as read: as ingest recorded it, else the
    patches' extent."""
    if recorded is not None:
        ds = recorded.downsample
        return math.ceil(recorded.height / ds), math.ceil(recorded.width / ds)
    return int(cells.y.max()) + size, int(cells.x.max()) + size


def render_scan(
    cells: Cells,
    size: int,
    overlay: str,
    recorded: ScanSize | None = None,
    scale: tuple[float, float] = (HEAT_FLOOR, HEAT_SCALE),
) -> dict:
    """One scan's patch cells (positions in pixels as read) -> its heatmap columns; writes
    the overlay PNG to `overlay` as a side effect (a retried task overwrites it). `recorded`:
    the scan's size from ingest, when known; `scale`: the overlay's (HeatmapGeometry.heat)."""
    from anogan_batch.io.plots import png_bytes

    ds = recorded.downsample if recorded else 1.0
    if not len(cells.x):
        shown = (recorded.height, recorded.width) if recorded else (0, 0)
        return _skipped(*shown, "no scored patch carries heat cells")
    height, width = canvas_size(cells, size, recorded)
    shape = grid_shape(height, width, heat_cell(size))
    heat, thumb = stitch_cells(cells, size, shape)
    if thumb is None:
        thumb = np.zeros((*heat.shape, 1), np.float32)
    radius = heat_blur_cells(size)
    storage.write_bytes(overlay, png_bytes(enlarge(colorize(thumb, heat, radius, scale), shape[2])))
    level0 = (recorded.height, recorded.width) if recorded else (height, width)
    return {
        HEIGHT: np.array([level0[0]], dtype=np.int32),
        WIDTH: np.array([level0[1]], dtype=np.int32),
        HEAT_SLICE: [None],  # a volume's: set by the caller
        CELL: np.array([shape[2] * ds], dtype=np.float64),  # level-0 pixels a side
        GRID_HEIGHT: np.array([heat.shape[0]], dtype=np.int32),
        GRID_WIDTH: np.array([heat.shape[1]], dtype=np.int32),
        HEATMAP: [heat.astype("<f4").tobytes()],
        MAX_HEAT: [float(heat.max())],
        MEAN_HEAT: [float(heat.mean())],
        OVERLAY: [overlay],
        HEATMAP_SKIPPED: [None],
    }


def _skipped(height: int, width: int, why: str) -> dict:
    bounded = [min(v, np.iinfo(np.int32).max) for v in (height, width)]
    nulls = {k: [None] for k in (HEAT_SLICE, CELL, GRID_HEIGHT, GRID_WIDTH, HEATMAP,
                                 MAX_HEAT, MEAN_HEAT, OVERLAY)}  # fmt: skip
    return {
        HEIGHT: np.array(bounded[:1], dtype=np.int32),
        WIDTH: np.array(bounded[1:], dtype=np.int32),
        **nulls,
        HEATMAP_SKIPPED: [why],
    }


def heatmap_for(out: str, scan_id: str) -> np.ndarray:
    """One scan's heat grid (grid_height, grid_width) float32 from OUT/heatmaps; InputError if
    absent. A cell is `heat_grid_for(...)[1]` pixels of the scan a side."""
    return heat_grid_for(out, scan_id)[0]


def heat_grid_for(out: str, scan_id: str) -> tuple[np.ndarray, float]:
    """(one scan's heat grid, its cell side in level-0 pixels) from OUT/heatmaps; InputError
    if absent."""
    import pyarrow.dataset as pads

    from anogan_batch.errors import InputError
    from anogan_batch.io.tables import open_dataset
    from anogan_batch.job.layout import JobLayout

    ds = open_dataset(JobLayout(out).heatmaps)
    wanted = (CELL, GRID_HEIGHT, GRID_WIDTH, HEATMAP, HEATMAP_SKIPPED)
    columns = [c for c in wanted if c in ds.schema.names]
    if GRID_HEIGHT not in columns:
        raise InputError(f"'{out}/heatmaps' was written by an older version: rerun the job")
    rows = ds.to_table(columns=columns, filter=pads.field(SCAN_ID) == scan_id)
    if rows.num_rows == 0:
        raise InputError(f"no heatmap for scan_id {scan_id!r} in '{out}/heatmaps'")
    if rows.column(HEATMAP)[0].as_py() is None:
        why = rows.column(HEATMAP_SKIPPED)[0].as_py()
        raise InputError(f"scan_id {scan_id!r} has no heatmap: {why}")
    h, w = rows.column(GRID_HEIGHT)[0].as_py(), rows.column(GRID_WIDTH)[0].as_py()
    grid = np.frombuffer(rows.column(HEATMAP)[0].as_py(), dtype="<f4").reshape(h, w)
    return grid, float(rows.column(CELL)[0].as_py())


# The export's tiles and how small its coarsest level gets
EXPORT_TILE = 256


def export_tiff(out: str, scan_id: str, path: str) -> dict:
    """Write one scan's overlay as a tiled, pyramidal OME-TIFF at `path` (a local file) that
    slide viewers open (QuPath, napari, OpenSeadragon through a tile server): the overlay PNG,
    then levels halving down to one tile. -> what was written."""
    import io

    import tifffile
    from PIL import Image

    from anogan_batch.job.layout import JobLayout

    grid, cell = heat_grid_for(out, scan_id)
    png = storage.read_bytes(JobLayout(out).overlay(scan_id))
    with Image.open(io.BytesIO(png)) as image:
        rgb = np.asarray(image.convert("RGB"))
    levels = [rgb]
    while min(levels[-1].shape[:2]) > EXPORT_TILE:
        levels.append(levels[-1][::2, ::2])
    per_pixel = cell * grid.shape[1] / rgb.shape[1]  # level-0 pixels of the scan a pixel
    options = {"tile": (EXPORT_TILE, EXPORT_TILE), "compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata={"Name": scan_id}, **options)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **options)
    return {"levels": len(levels), "shape": list(rgb.shape), "scan_pixels_per_pixel": per_pixel}
