"""The config of `anogan-batch ingest` (scans -> patch table): its fields, defaults and flags.

Light on purpose (no torch, numpy, pyarrow or Ray): the CLI reads these defaults for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from anogan_batch.errors import ConfigError
from anogan_batch.fields import check_choice, check_float, check_int, option

if TYPE_CHECKING:
    from anogan_batch.io.readers import ReadOptions

ENGINES = ("auto", "local", "ray")
AUTO_RAY_FILES = 256  # `auto` uses Ray above this many files (or when RAY_ADDRESS is set)
AUTO_RAY_UNITS = 16  # ... or for this many work units of slides (ingest/plan.UNIT_PATCHES)
# Values decoded from one file at most (all its slices): 512 CT slices of 512 x 512. Sizes come
# from headers that anyone can write, so they are checked before anything is allocated.
MAX_PIXELS = 2**27


def parse_window(text: str) -> tuple[float, float]:
    """'40,400' -> (40.0, 400.0): --window CENTER,WIDTH."""
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("--window", text, "must be CENTER,WIDTH, e.g. 40,400") from None
    return center, width


@dataclass(frozen=True)
class IngestConfig:
    patch_size: int = option(help="patch side P in pixels")
    stride: int | None = option(None, "grid step", default_text="P (non-overlapping patches)")
    label_from_parent: bool = option(False, "label = name of the file's folder")
    rows_per_file: int = option(50_000, "target rows per output Parquet file")
    slice_axis: int = option(0, "axis of 3-D NPY volumes that indexes slices")
    window: tuple[float, float] | None = option(
        None,
        "CENTER,WIDTH in source units (DICOM: after rescale); values in the window map "
        "linearly onto uint16",
        default_text="none: the file's own range",
        parse=parse_window,
    )
    min_foreground: float = option(
        0.0,
        "skip patches with less foreground (0-1) than this: saturated pixels of colour scans, "
        "above the intensity's Otsu threshold for grayscale (or the user's --mask)",
    )
    engine: str = option("auto", f"auto (Ray above {AUTO_RAY_FILES} files), local, or ray")
    max_pixels: int = option(
        MAX_PIXELS,
        "values one read may hold: a whole file for formats read whole (all its slices), one "
        "region of a slide (a tile or strip larger is refused); larger files are quarantined "
        "before decoding",
    )
    mpp: float | None = option(
        None,
        "µm per pixel to read slides at: the nearest pyramid level within 5 %, else the next "
        "finer one downsampled by area (ingest/levels.py)",
        default_text="level 0 (or --level)",
    )
    mask: str = option(
        "auto",
        "the foreground --min-foreground decides on: auto (computed: ingest/masks.py), or a "
        "folder of your masks, <scan_id>.png/.tif/.npy, any size, nonzero = foreground (then "
        "--min-foreground defaults to 0.5)",
    )
    level: int | None = option(
        None, "the pyramid level to read slides at (0: full size)", default_text="0 (or --mpp)"
    )

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size, min_value=4)
        if self.stride is not None:
            check_int("stride", self.stride, min_value=1)
        check_int("rows_per_file", self.rows_per_file, min_value=1)
        check_choice("slice_axis", self.slice_axis, (-3, -2, -1, 0, 1, 2))
        check_float("min_foreground", self.min_foreground, low=0.0, high=1.0)
        check_choice("engine", self.engine, ENGINES)
        check_int("max_pixels", self.max_pixels, min_value=1)
        if self.mpp is not None:
            check_float("mpp", self.mpp, low=0.0, low_open=True)
        if self.level is not None:
            check_int("level", self.level, min_value=0)
        if self.mask != "auto" and not self.mask.strip():
            raise ConfigError("mask", self.mask, "use auto or a folder of <scan_id>.png masks")
        if self.mpp is not None and self.level is not None:
            raise ConfigError("level", self.level, "give --mpp or --level, not both")
        if self.window is not None:
            check_float("window center", self.window[0])
            check_float("window width", self.window[1], low=0.0, low_open=True)

    @property
    def step(self) -> int:
        return self.stride or self.patch_size

    @property
    def foreground_share(self) -> float:
        """The share of a patch inside the mask it needs: --min-foreground, or with the
        user's masks and no --min-foreground, half."""
        if self.mask != "auto" and self.min_foreground == 0:
            return 0.5
        return self.min_foreground

    @property
    def read_options(self) -> ReadOptions:
        from anogan_batch.io.readers import ReadOptions

        return ReadOptions(
            slice_axis=self.slice_axis, window=self.window, max_pixels=self.max_pixels
        )

    @property
    def max_file_bytes(self) -> int:
        """Largest file read: its pixels as float64 plus room for headers and metadata."""
        return 8 * self.max_pixels + 2**24
