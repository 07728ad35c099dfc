"""Which resolution a scan is read at: `--mpp` (µm per pixel) or `--level`.

`--mpp M`: the native level whose pixel size is within MPP_TOLERANCE of M; otherwise the next
finer level, area-downsampled to M. A file without a pixel size cannot honour M: it is read at
level 0 (or `--level`) and its scan row says so. Neither flag: level 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from anogan_batch.ingest.sources import Source

MPP_TOLERANCE = 0.05  # a native level this close to the asked pixel size is used as it is


class Resolution(NamedTuple):
    """How a scan is read: `level`, then scaled down by `factor` (1: as stored)."""

    level: int
    factor: float  # level pixels per output pixel, >= 1
    downsample: float  # level-0 pixels per output pixel
    mpp: float | None  # µm per output pixel, when the file has a pixel size
    warning: str | None  # why the asked resolution could not be honoured


def choose(source: Source, mpp: float | None = None, level: int | None = None) -> Resolution:
    """The resolution to read `source` at (the module's docstring)."""
    levels = source.levels
    if level is not None and not 0 <= level < len(levels):
        raise ValueError(f"--level {level} does not exist: the file has {len(levels)} level(s)")
    if mpp is None or source.mpp is None:
        chosen = level or 0
        ds = levels[chosen].downsample
        warning = None
        if mpp is not None:
            warning = f"no pixel size in the file: --mpp {mpp:g} not applied, level {chosen} read"
        return Resolution(chosen, 1.0, ds, source.mpp and source.mpp * ds, warning)
    wanted = mpp / source.mpp  # level-0 pixels per output pixel
    if wanted < 1 - MPP_TOLERANCE:
        why = f"--mpp {mpp:g} is finer than the file's {source.mpp:g}: read at level 0"
        return Resolution(0, 1.0, 1.0, source.mpp, why)
    for k, lv in enumerate(levels):
        if abs(lv.downsample - wanted) <= MPP_TOLERANCE * wanted:
            return Resolution(k, 1.0, lv.downsample, source.mpp * lv.downsample, None)
    finer = max((k for k, lv in enumerate(levels) if lv.downsample < wanted), default=0,
                key=lambda k: levels[k].downsample)  # fmt: skip
    factor = wanted / levels[finer].downsample
    return Resolution(finer, factor, wanted, mpp, None)


def area_downsample(values: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) -> (out_h, out_w, C): each output pixel the area-weighted mean of the input
    pixels it covers (any factor, not only whole ones; Pillow's box filter), in the input's
    dtype."""
    from PIL import Image

    c = values.shape[2]
    if values.dtype == np.uint8 and c in (1, 3):
        image = Image.fromarray(values[:, :, 0] if c == 1 else values)
        out = np.asarray(image.resize((out_w, out_h), Image.Resampling.BOX))
        return out.reshape(out_h, out_w, c)
    planes = [
        np.asarray(Image.fromarray(values[:, :, k].astype(np.float32), mode="F")
                   .resize((out_w, out_h), Image.Resampling.BOX))
        for k in range(c)
    ]  # fmt: skip
    mixed = np.stack(planes, axis=2)
    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(values.dtype)
        return np.clip(np.rint(mixed), info.min, info.max).astype(values.dtype)
    return mixed.astype(values.dtype)
