"""Committed generators of slide files for the tests and the bench: tiled, pyramidal TIFFs
written by tifffile (generic with resolution tags, OME-TIFF), and untiled ones. The content is
synthetic H&E: pale glass and ellipses of stained, textured tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GLASS = (236, 234, 238)


def tissue_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W) bool: two ellipses of tissue, about a third of the slide."""
    yy, xx = np.ogrid[:height, :width]
    one = ((yy - 0.5 * height) / (0.4 * height)) ** 2 + ((xx - 0.33 * width) / (0.21 * width)) ** 2
    two = ((yy - 0.33 * height) / (0.17 * height)) ** 2 + ((xx - 0.8 * width) / (0.12 * width)) ** 2
    return (one < 1) | (two < 1)


def slide_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: glass, and tissue in H&E-like pinks and purples with texture."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = GLASS
    mask = tissue_mask(height, width, seed)
    n = int(mask.sum())
    base = np.array([170, 80, 160], np.float64)
    img[mask] = np.clip(base + rng.normal(0, 25, (n, 3)), 0, 255).astype(np.uint8)
    return img


def write_pyramid(
    path: Path | str,
    pixels: np.ndarray,
    *,
    levels: int = 3,
    tile: int = 256,
    mpp: float | None = 0.25,
    ome: bool = False,
    compression: str = "zlib",
) -> None:
    """A tiled TIFF of `pixels` with `levels` levels (each half the last) as SubIFDs; the
    pixel size in the resolution tags (or OME-XML's PhysicalSizeX with `ome`)."""
    import tifffile

    photometric = "rgb" if pixels.ndim == 3 and pixels.shape[2] == 3 else "minisblack"
    options = {"tile": (tile, tile), "compression": compression, "photometric": photometric}
    extra = {}
    if mpp is not None and not ome:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    metadata = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if ome and mpp else None
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        tw.write(pixels, subifds=levels - 1, metadata=metadata, **extra, **options)
        for k in range(1, levels):
            step = 2**k
            tw.write(pixels[::step, ::step], subfiletype=1, **options)


def write_untiled(path: Path | str, pixels: np.ndarray, rows_per_strip: int | None = None):
    """A plain TIFF in strips (one strip for the whole image when `rows_per_strip` is None)."""
    import tifffile

    strip = {"rowsperstrip": rows_per_strip or pixels.shape[0]}
    tifffile.imwrite(path, pixels, **strip)
