"""Per-scan anomaly heatmaps: patch residual maps stitched back into full-size scan maps.

The per-scan groupby of aggregate.py brings together, for every scan, its patches' residual
maps (from OUT/patch_scores), their pixels (from the input patch table, for the overlay's
background) and the scan's size (from the table's `_scans.parquet`, written by ingest; without
it the patch grid's extent is used). `render_scan` turns them into:

- the heatmap: per pixel, the mean over channels of |x - G(z)| (model space, so 0..2), averaged
  over every patch covering the pixel (overlapping strides); pixels no scored patch covers
  (masked background) are 0;
- OUT/overlays/<scan_id>.png: the scan in gray with the heatmap on top ("hot" colours, opaque
  where the residual is large). For display only, the heatmap is smoothed by a box blur of
  radius P/7 (single-pixel stroke misalignments are not lesions) and mapped from
  [HEAT_FLOOR, HEAT_SCALE] onto the colour scale. The scale is fixed, not per scan, so
  overlays compare across scans and jobs.

OUT/heatmaps/ is a Parquet table, one row per scan: the scan_scores columns plus height, width,
heatmap (float32 little-endian bytes, row-major height x width), max_heat, mean_heat and
overlay (path of the PNG).
`heatmap_for(OUT, scan_id)` fetches one scan's map, reading only the row groups whose scan_id
statistics can match.
"""

from __future__ import annotations

import numpy as np

from anogan_batch import storage
from anogan_batch.patches import PIXEL_MAX

HEAT_FLOOR = 0.1  # smoothed residual per pixel below which nothing is drawn
HEAT_SCALE = 0.35  # smoothed residual shown at full colour (model space spans 0..2)
MAP_COLUMNS = ("height", "width", "heatmap", "max_heat", "mean_heat", "overlay")


def stitch(
    tiles: list[tuple[int, int, np.ndarray]], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
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


def box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edges replicated), separable via cumulative sums."""
    for axis in (0, 1):
        pad = [(radius + 1, radius) if i == axis else (0, 0) for i in range(2)]
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
        n = c.shape[axis]
        a = c.take(range(2 * radius + 1, n), axis) - c.take(range(n - 2 * radius - 1), axis)
        a = a / (2 * radius + 1)
    return a


def colorize(scan: np.ndarray, heat: np.ndarray, radius: int = 0) -> np.ndarray:
    """Scan in [0, 1] (H, W, C) and heat (H, W) -> RGB uint8 overlay."""
    gray = scan.mean(axis=2) if scan.shape[2] != 3 else None
    base = np.repeat(gray[:, :, None], 3, axis=2) if gray is not None else scan
    shown = box_blur(heat, radius) if radius else heat
    t = np.clip((shown - HEAT_FLOOR) / (HEAT_SCALE - HEAT_FLOOR), 0.0, 1.0)[:, :, None]
    hot = np.concatenate(
        [np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], 2
    )
    alpha = np.clip(1.5 * t, 0.0, 0.85)
    return np.rint((base * (1 - alpha) + hot * alpha) * 255).astype(np.uint8)


def render_scan(group: dict[str, np.ndarray], out: str, size: int, channels: int) -> dict:
    """One scan's shuffle rows (see aggregate.py) -> its heatmap columns; writes its overlay
    PNG as a side effect (named by scan_id, so a retried task overwrites it)."""
    from anogan_batch.aggregate import IMAGE, SCORE, SIZE
    from anogan_batch.plots import png_bytes

    scan_id = str(group["scan_id"][0])
    kinds = group["kind"]
    residual, image = [], []
    for i in np.flatnonzero(kinds != SIZE):
        dtype = str(group["dtype"][i])
        tile = np.frombuffer(group["data"][i], dtype=np.dtype(dtype).newbyteorder("<"))
        tile = tile.reshape(size, size, channels).astype(np.float32)
        if kinds[i] == SCORE:
            residual.append((int(group["x"][i]), int(group["y"][i]), tile))
        elif kinds[i] == IMAGE:
            image.append((int(group["x"][i]), int(group["y"][i]), tile / PIXEL_MAX.get(dtype, 1.0)))
    sizes = np.flatnonzero(kinds == SIZE)
    if len(sizes):
        width, height = int(group["x"][sizes[0]]), int(group["y"][sizes[0]])
    else:  # not ingested by us: the patch grid's extent
        width = max(x for x, _, _ in residual + image) + size
        height = max(y for _, y, _ in residual + image) + size
    heat = stitch(residual, height, width)[0].mean(axis=2).astype(np.float32)
    scan = stitch(image, height, width)[0] if image else np.zeros((height, width, 1), np.float32)
    overlay = storage.join(out, "overlays", scan_id + ".png")
    storage.write_bytes(overlay, png_bytes(colorize(scan, heat, max(1, size // 7))))
    return {
        "height": np.array([height], dtype=np.int32),
        "width": np.array([width], dtype=np.int32),
        "heatmap": [heat.astype("<f4").tobytes()],
        "max_heat": [float(heat.max())],
        "mean_heat": [float(heat.mean())],
        "overlay": [overlay],
    }


def heatmap_for(out: str, scan_id: str) -> np.ndarray:
    """One scan's heatmap (height, width) float32 from OUT/heatmaps; InputError if absent."""
    import pyarrow.dataset as pads

    from anogan_batch.errors import InputError
    from anogan_batch.tables import open_dataset

    ds = open_dataset(storage.join(out, "heatmaps"))
    rows = ds.to_table(
        columns=["height", "width", "heatmap"], filter=pads.field("scan_id") == scan_id
    )
    if rows.num_rows == 0:
        raise InputError(f"no heatmap for scan_id '{scan_id}' in '{out}/heatmaps'")
    h, w = rows.column("height")[0].as_py(), rows.column("width")[0].as_py()
    return np.frombuffer(rows.column("heatmap")[0].as_py(), dtype="<f4").reshape(h, w)
