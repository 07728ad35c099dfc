"""Scan files as sources that read regions: a gigapixel slide is never decoded whole.

A `Source` has levels (level 0 the full resolution, then coarser ones with their real
downsample factors), channels, a dtype, a pixel size in µm where the file has one, and
`read_region(x, y, w, h, level)`: the w x h pixels of `level` whose top-left corner is at
level-0 pixel (x, y). Pixels outside the image read as 0.

- `TiffSource`: a TIFF whose first series is one 2-D image (tiled or in strips, with or
  without a pyramid: generic, OME-TIFF, SVS, NDPI). A read decodes only the tiles or strips it
  touches (tifffile's own segment decoder, imagecodecs for JPEG / JPEG 2000), through a cache
  of CACHE_BYTES decoded segments. The header is the file's word: a segment (one tile or
  strip) of more values than the read budget is refused before anything is decoded.
- `ArraySource`: an image already in memory (PNG, JPEG, NPY, DICOM, NIfTI slices, TIFF
  stacks: io/readers decodes those whole, within --max-pixels per file).

The read budget (`--max-pixels`) bounds one `read_region`, never the scan.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from anogan_batch.io.columns import MPP

# Decoded tiles a TiffSource keeps: a row of 256-pixel RGB tiles across 40,000 pixels is
# 30 MB, so neighbouring patch rows reuse their tiles.
CACHE_BYTES = 64 * 2**20


class UndecodableRegion(ValueError):
    """A part of the file's data that cannot be decoded: a fault of the file, quarantined with
    its patches. A fault of the storage (an OSError: S3, a disk) is not one: it propagates, so
    that the task is retried or the ingest exits 1."""


class Level(NamedTuple):
    height: int
    width: int
    downsample: float  # level-0 pixels per pixel of this level (along x)


class Source:
    """A scan that reads regions; see the module's docstring."""

    format: str = "array"  # "tiff" (tiled / strips), "array"
    backend: str = "numpy"
    levels: tuple[Level, ...] = ()
    channels: int = 1
    dtype: np.dtype = np.dtype(np.uint8)
    mpp: float | None = None  # µm per level-0 pixel, when the file says
    budget: int = 2**27  # values one read may hold

    def read_region(
        self, x: int, y: int, w: int, h: int, level: int = 0, *, tolerant: bool = False
    ) -> np.ndarray:
        """(h, w, channels) values of `level`, top-left at level-0 pixel (x, y). `tolerant`:
        a part that cannot be decoded reads as 0 (an overview), instead of raising."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What this source is, for the scan's row in _scans.parquet."""
        return {
            "format": self.format,
            "backend": self.backend,
            "levels": [list(lv) for lv in self.levels],
            MPP: self.mpp,
        }

    def check_read(self, w: int, h: int) -> None:
        if w * h * self.channels > self.budget:
            raise ValueError(
                f"a read of {w}x{h}x{self.channels} values is over the budget of "
                f"{self.budget:,} (--max-pixels)"
            )

    def close(self) -> None:
        pass


class ArraySource(Source):
    """An image in memory, (H, W) or (H, W, C): one level."""

    def __init__(self, values: np.ndarray, budget: int = 2**27, mpp: float | None = None):
        self.values = values if values.ndim == 3 else values[:, :, None]
        h, w, c = self.values.shape
        self.levels = (Level(h, w, 1.0),)
        self.channels, self.dtype, self.budget, self.mpp = c, values.dtype, budget, mpp

    def read_region(
        self, x: int, y: int, w: int, h: int, level: int = 0, *, tolerant: bool = False
    ) -> np.ndarray:
        if level != 0:
            raise ValueError(f"level {level} does not exist (the image has one level)")
        self.check_read(w, h)
        return _window(self.values, x, y, w, h)


def _window(values: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """values[y:y+h, x:x+w], zero-filled where the window leaves the image."""
    out = np.zeros((h, w, values.shape[2]), values.dtype)
    hh, ww = values.shape[:2]
    y0, y1, x0, x1 = max(0, y), min(hh, y + h), max(0, x), min(ww, x + w)
    if y0 < y1 and x0 < x1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = values[y0:y1, x0:x1]
    return out


class TiffSource(Source):
    """A TIFF's first series, read segment by segment (module docstring)."""

    format, backend = "tiff", "tifffile"

    def __init__(self, fh, budget: int = 2**27, cache_bytes: int = CACHE_BYTES):
        import tifffile

        self.budget = budget
        self._tif = tifffile.TiffFile(fh)
        try:
            series = self._tif.series[0]
            self._pages = [lv.keyframe for lv in series.levels]
            for page in self._pages:
                _check_page(page, budget)
        except Exception:
            self._tif.close()
            raise
        base = self._pages[0]
        self.channels = int(base.samplesperpixel)
        self.dtype = np.dtype(base.dtype)
        self.levels = tuple(
            Level(int(p.imagelength), int(p.imagewidth), base.imagewidth / p.imagewidth)
            for p in self._pages
        )
        self.mpp = pixel_size(self._tif, base)
        self.pyramid = _pyramid_kind(self._tif)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._cache_bytes = cache_bytes

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pyramid": self.pyramid}

    def read_region(
        self, x: int, y: int, w: int, h: int, level: int = 0, *, tolerant: bool = False
    ) -> np.ndarray:
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} does not exist (the file has {len(self.levels)})")
        self.check_read(w, h)
        page, ds = self._pages[level], self.levels[level].downsample
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        out = np.zeros((h, w, self.channels), self.dtype)
        seg_h, seg_w = _segment_shape(page)
        across = -(-int(page.imagewidth) // seg_w)
        rows = range(max(0, ly // seg_h), min(-(-int(page.imagelength) // seg_h),
                                               -(-(ly + h) // seg_h)))  # fmt: skip
        cols = range(max(0, lx // seg_w), min(across, -(-(lx + w) // seg_w)))
        for r in rows:
            for c in cols:
                try:
                    tile = self._segment(level, r * across + c)  # (th, tw, S)
                except UndecodableRegion:
                    if not tolerant:
                        raise
                    continue  # left as 0
                ty, tx = r * seg_h, c * seg_w
                y0, y1 = max(ly, ty), min(ly + h, ty + tile.shape[0])
                x0, x1 = max(lx, tx), min(lx + w, tx + tile.shape[1])
                if y0 < y1 and x0 < x1:
                    out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = tile[y0 - ty : y1 - ty,
                                                                     x0 - tx : x1 - tx]  # fmt: skip
        return out

    def _segment(self, level: int, index: int) -> np.ndarray:
        """One decoded tile or strip (rows, columns, samples), through the cache."""
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        segment = None  # a tile the writer left out: background
        if count:
            data = self._read(offset, count)  # a fault of the storage propagates as it is
            try:
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as e:  # the file's bytes: this region of it is unreadable
                raise UndecodableRegion(f"tile or strip {index}: {e}") from e
        seg_h, seg_w = _segment_shape(page)
        tile = np.zeros((seg_h, seg_w, self.channels), self.dtype)
        if segment is not None:
            values = np.asarray(segment).reshape(segment.shape[-3:])[:seg_h, :seg_w]
            tile[: values.shape[0], : values.shape[1]] = values
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return tile

    def _read(self, offset: int, count: int) -> bytes:
        fh = self._tif.filehandle
        fh.seek(offset)
        return fh.read(count)

    def close(self) -> None:
        self._tif.close()


def _segment_shape(page) -> tuple[int, int]:
    """(rows, columns) of one tile, or of one strip."""
    if page.is_tiled:
        return int(page.tilelength), int(page.tilewidth)
    return min(int(page.rowsperstrip), int(page.imagelength)), int(page.imagewidth)


def _check_page(page, budget: int) -> None:
    """Refuse, before decoding, a page this source cannot read region by region."""
    if page.planarconfig != 1 and page.samplesperpixel > 1:
        raise ValueError("planar-separate TIFF samples cannot be read by region")
    if page.imagedepth != 1:
        raise ValueError("a TIFF of 3-D tiles cannot be read by region")
    seg_h, seg_w = _segment_shape(page)
    # a header may declare any size: the segments the file lists must cover it, so that the
    # patch grid of a slide is bounded by the file's own bytes (8 of them a tile at least)
    declared = -(-int(page.imagelength) // seg_h) * -(-int(page.imagewidth) // seg_w)
    if len(page.dataoffsets) != declared or len(page.databytecounts) != declared:
        raise ValueError(
            f"the TIFF declares a {page.imagelength}x{page.imagewidth} image of {declared:,} "
            f"{'tiles' if page.is_tiled else 'strips'} but lists {len(page.dataoffsets):,}"
        )
    values = seg_h * seg_w * int(page.samplesperpixel)
    if values > budget:
        raise ValueError(
            f"one {'tile' if page.is_tiled else 'strip'} of this TIFF declares {values:,} "
            f"values, over the read budget of {budget:,} (a decompression bomb, or an untiled "
            "file larger than one read: refused before decoding; see --max-pixels)"
        )


def is_single_image_tiff(tif) -> bool:
    """A TIFF whose first series is one 2-D image (gray or with samples), with its pyramid:
    what TiffSource reads; stacks of pages stay with io/readers (a slice each)."""
    series = tif.series[0] if tif.series else None
    if series is None:
        return False
    axes = series.axes
    return axes in ("YX", "YXS")


# µm per pixel in an SVS description ("... |MPP = 0.2520|...") and OME-XML's PhysicalSizeX
_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+)")
_OME_SIZE = re.compile(r'PhysicalSizeX="([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"')
_OME_UNIT = re.compile(r'PhysicalSizeXUnit="([^"]+)"')
_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def pixel_size(tif, page) -> float | None:
    """µm per level-0 pixel: from SVS's description, OME-XML, or the resolution tags (when
    their unit is a length); None when the file does not say."""
    description = str(getattr(page, "description", "") or "")
    found = _SVS_MPP.search(description) if tif.is_svs else None
    if found:
        return _positive(float(found.group(1)))
    if tif.is_ome:
        xml = tif.ome_metadata or ""
        size, unit = _OME_SIZE.search(xml), _OME_UNIT.search(xml)
        if size:
            scale = _UNIT_UM.get(unit.group(1) if unit else "µm")
            return _positive(float(size.group(1)) * scale) if scale else None
    tag, unit_tag = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is None or unit_tag is None:
        return None
    num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
    per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit_tag.value))  # inch, cm, in µm
    if per_unit is None or not num or not den:
        return None
    return _positive(per_unit * den / num)


def _positive(value: float) -> float | None:
    return value if math.isfinite(value) and value > 0 else None


def _pyramid_kind(tif) -> str:
    for kind in ("svs", "ome", "ndpi"):
        if getattr(tif, f"is_{kind}", False):
            return kind
    return "tiff"


def open_tiff(fh, budget: int = 2**27) -> TiffSource | None:
    """`fh` (a seekable binary file) as a TiffSource when its first series is one 2-D image;
    None for a stack of pages (io/readers reads those, a slice each). Raises for a file that
    is not a TIFF or that cannot be read by region."""
    import tifffile

    with tifffile.TiffFile(fh) as tif:
        single = is_single_image_tiff(tif)
    if not single:
        return None
    fh.seek(0)
    return TiffSource(fh, budget)
