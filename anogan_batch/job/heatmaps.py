"""Per-scan anomaly heatmaps: patch residual maps stitched back into full-size scan maps.

The per-scan groupby of aggregate.py brings together, for every scan, its patches' residual
maps (from OUT/patch_scores), their pixels (from the input patch table, for the overlay's
background) and the scan's size (from the table's `_scans.parquet`, written by ingest; without
it the patch grid's extent is used). `render_scan` turns them into:

- the heatmap: per pixel, the mean over channels of |x - G(z)| (model space, so 0..2), averaged
  over every patch covering the pixel (overlapping strides); pixels no scored patch covers
  (masked background) are 0;
- the overlay PNG (OUT/overlays/, named by `layout.file_stem(scan_id)`): the scan in gray with
  the heatmap on top ("hot" colours, opaque where the residual is large). For display only,
  the heatmap is smoothed by a box blur of radius P/7 (single-pixel stroke misalignments are
  not lesions) and mapped onto the colour scale from the model's calibration: tinted above
  the 99th percentile of its normal patches' smoothed pixel residuals, full colour from the
  99.9th (core/calibration.normal_heat), so normal tissue stays dark and one scale holds for
  every scan and job of the model. A model without that record gets the fixed scale
  [HEAT_FLOOR, HEAT_SCALE]; either way, never a per-scan scale.

Positions and sizes come from input tables, so they are bounded before they size an array: a
tile outside its scan is left out, and a scan larger than MAX_HEATMAP_PIXELS gets no heatmap
(`heatmap_skipped` says why) rather than an allocation the data asked for.

OUT/heatmaps/ is a Parquet table, one row per scan: the scan_scores columns plus height, width,
heatmap (float32 little-endian bytes, row-major height x width), max_heat, mean_heat, overlay
(path of the PNG) and heatmap_skipped.
`heatmap_for(OUT, scan_id)` fetches one scan's map, reading only the row groups whose scan_id
statistics can match.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from anogan_batch.core.calibration import box_blur, heat_radius
from anogan_batch.io import storage

# The fixed scale of a model whose calibration has no `heat` record (model space spans 0..2):
HEAT_FLOOR = 0.1  # smoothed residual per pixel below which nothing is drawn
HEAT_SCALE = 0.35  # smoothed residual shown at full colour
# Largest scan (height x width) that gets a heatmap: its stitching holds a few float64 copies
# of it, so this bounds the memory one scan may ask for.
MAX_HEATMAP_PIXELS = 2**25
MAP_COLUMNS = (
    "height", "width", "heatmap", "max_heat", "mean_heat", "overlay", "heatmap_skipped",
)  # fmt: skip

Tile = tuple[int, int, np.ndarray]  # (x, y, pixels (P, P, C))


class HeatmapGeometry(NamedTuple):
    """What a job's tiles look like: the model's patch side, channels and stored dtype (the
    pixel dtype of rows whose table has no `dtype` column)."""

    size: int
    channels: int
    dtype: str | None = None
    heat: tuple[float, float] = (HEAT_FLOOR, HEAT_SCALE)  # the overlay's (tinted, full colour)


def stitch(tiles: list[Tile], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, tile (P, P, C)) -> (mean-over-overlaps image (H, W, C), coverage count (H, W))."""
    channels = tiles[0][2].shape[2] if tiles else 1
    total = np.zeros((height, width, channels), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.int32)
    for x, y, tile in tiles:
        p_h, p_w = tile.shape[:2]
        total[y : y + p_h, x : x + p_w] += tile
        count[y : y + p_h, x : x + p_w] += 1
    mean = total / np.maximum(count, 1)[:, :, None]
    return mean.astype(np.float32), count


def colorize(
    scan: np.ndarray,
    heat: np.ndarray,
    radius: int = 0,
    scale: tuple[float, float] = (HEAT_FLOOR, HEAT_SCALE),
) -> np.ndarray:
    """Scan in [0, 1] (H, W, C) and heat (H, W) -> RGB uint8 overlay; `scale`: the smoothed
    residual from which a pixel is tinted, and from which it is at full colour."""
    gray = scan.mean(axis=2) if scan.shape[2] != 3 else None
    base = np.repeat(gray[:, :, None], 3, axis=2) if gray is not None else scan
    shown = box_blur(heat, radius) if radius else heat
    floor, full = scale
    t = np.clip((shown - floor) / (full - floor), 0.0, 1.0)[:, :, None]
    hot = np.concatenate(
        [np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], 2
    )
    alpha = np.clip(1.5 * t, 0.0, 0.85)
    return np.rint((base * (1 - alpha) + hot * alpha) * 255).astype(np.uint8)


def canvas_size(residual: list[Tile], image: list[Tile], size: int, recorded) -> tuple[int, int]:
    """(height, width) of a scan: as ingest recorded it, else the patch grid's extent."""
    if recorded is not None:
        return recorded
    tiles = residual + image
    return max(y for _, y, _ in tiles) + size, max(x for x, _, _ in tiles) + size


def inside(tiles: list[Tile], height: int, width: int) -> list[Tile]:
    """The tiles that lie wholly inside a height x width scan."""
    return [
        (x, y, t)
        for x, y, t in tiles
        if x >= 0 and y >= 0 and x + t.shape[1] <= width and y + t.shape[0] <= height
    ]


def render_scan(
    residual: list[Tile],
    image: list[Tile],
    size: int,
    overlay: str,
    recorded: tuple[int, int] | None = None,
    scale: tuple[float, float] = (HEAT_FLOOR, HEAT_SCALE),
) -> dict:
    """One scan's residual tiles and pixel tiles (scaled to [0, 1]) -> its heatmap columns;
    writes the overlay PNG to `overlay` as a side effect (a retried task overwrites it).
    `recorded`: the scan's (height, width) from ingest, when known; `scale`: the overlay's
    (HeatmapGeometry.heat)."""
    from anogan_batch.io.plots import png_bytes

    height, width = canvas_size(residual, image, size, recorded)
    if height * width > MAX_HEATMAP_PIXELS:
        return _skipped(
            height, width, f"scan is {height}x{width}, over the {MAX_HEATMAP_PIXELS:,}-pixel "
            "heatmap limit",
        )  # fmt: skip
    residual, image = inside(residual, height, width), inside(image, height, width)
    heat = stitch(residual, height, width)[0].mean(axis=2).astype(np.float32)
    scan = stitch(image, height, width)[0] if image else np.zeros((height, width, 1), np.float32)
    storage.write_bytes(overlay, png_bytes(colorize(scan, heat, heat_radius(size), scale)))
    return {
        "height": np.array([height], dtype=np.int32),
        "width": np.array([width], dtype=np.int32),
        "heatmap": [heat.astype("<f4").tobytes()],
        "max_heat": [float(heat.max())],
        "mean_heat": [float(heat.mean())],
        "overlay": [overlay],
        "heatmap_skipped": [None],
    }


def _skipped(height: int, width: int, why: str) -> dict:
    bounded = [min(v, np.iinfo(np.int32).max) for v in (height, width)]
    return {
        "height": np.array(bounded[:1], dtype=np.int32),
        "width": np.array(bounded[1:], dtype=np.int32),
        "heatmap": [None],
        "max_heat": [None],
        "mean_heat": [None],
        "overlay": [None],
        "heatmap_skipped": [why],
    }


def heatmap_for(out: str, scan_id: str) -> np.ndarray:
    """One scan's heatmap (height, width) float32 from OUT/heatmaps; InputError if absent."""
    import pyarrow.dataset as pads

    from anogan_batch.errors import InputError
    from anogan_batch.io.tables import open_dataset
    from anogan_batch.job.layout import JobLayout

    ds = open_dataset(JobLayout(out).heatmaps)
    columns = [c for c in ("height", "width", "heatmap", "heatmap_skipped") if c in ds.schema.names]
    rows = ds.to_table(columns=columns, filter=pads.field("scan_id") == scan_id)
    if rows.num_rows == 0:
        raise InputError(f"no heatmap for scan_id {scan_id!r} in '{out}/heatmaps'")
    if rows.column("heatmap")[0].as_py() is None:
        why = rows.column("heatmap_skipped")[0].as_py() if "heatmap_skipped" in columns else None
        raise InputError(f"scan_id {scan_id!r} has no heatmap: {why}")
    h, w = rows.column("height")[0].as_py(), rows.column("width")[0].as_py()
    return np.frombuffer(rows.column("heatmap")[0].as_py(), dtype="<f4").reshape(h, w)
