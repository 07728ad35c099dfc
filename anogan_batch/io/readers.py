"""Scan file formats: bytes -> 2-D images, and how their values become stored pixels.

A reader turns one file's bytes into a list of `Image`s: one for a 2-D file, one per page or
slice for multi-page TIFFs, NPY volumes and multi-frame DICOMs (the `suffix` then names the
slice, e.g. "@0007"). Readers return values in the file's own units and depth; `to_stored`
then applies the one documented normalisation:

- 8-bit sources stay uint8 (model space: v / 255), 16-bit sources stay uint16 (v / 65535):
  the depth of the file is kept end to end.
- float sources stay float32 when they already lie in [0, 1].
- with a window (`--window CENTER,WIDTH`, in the source's units after DICOM rescale), values
  are clipped to [C - W/2, C + W/2] and mapped linearly onto uint16 0..65535.
- DICOM without `--window`: the full range its BitsStored can hold, after RescaleSlope and
  RescaleIntercept, is the window; MONOCHROME1 is inverted so that bright means dense.
- anything else (signed integers, floats outside [0, 1]) needs `--window`: it is refused with
  that advice rather than guessed.

A new format is a function `(raw: bytes, opts: ReadOptions) -> list[Image]` and one line in
`READERS`; `suffix_of` knows the one two-part suffix, `.nii.gz`.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReadOptions:
    slice_axis: int = 0  # which axis of a 3-D NPY volume indexes its slices
    window: tuple[float, float] | None = None  # (center, width) in source units
    max_pixels: int = 2**27  # values one file may decode to, all slices and channels


def check_size(declared: int, opts: ReadOptions, what: str) -> None:
    """Refuse a file whose header declares more values than `max_pixels`, before decoding:
    the header is the file's word, and a 30-byte header can ask for terabytes."""
    if declared > opts.max_pixels:
        raise ValueError(
            f"{what} declares {declared:,} values, over the limit of {opts.max_pixels:,} "
            "(a decompression bomb, or raise --max-pixels)"
        )


@dataclass
class Image:
    suffix: str  # "" for a 2-D file, "@0007" for slice 7 of a volume
    values: np.ndarray  # (H, W) or (H, W, C), the source's own dtype and units
    default_window: tuple[float, float] | None = None  # used when the user gave none


Reader = Callable[[bytes, ReadOptions], list[Image]]


def slice_suffix(i: int) -> str:
    return f"@{i:04d}"


def _slices(arrays: list[np.ndarray]) -> list[Image]:
    if len(arrays) == 1:
        return [Image("", arrays[0])]
    return [Image(slice_suffix(i), a) for i, a in enumerate(arrays)]


def read_pil(raw: bytes, opts: ReadOptions) -> list[Image]:
    """PNG / JPEG via Pillow: 8-bit gray or RGB, 16-bit gray; alpha and palettes dropped."""
    import warnings

    from PIL import Image as PILImage

    # check_size below replaces Pillow's own bomb check (a warning, or an error at twice its
    # fixed limit), so that one limit, --max-pixels, holds for every format
    PILImage.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        img = PILImage.open(io.BytesIO(raw))
    with img:
        width, height = img.size
        check_size(width * height * len(img.getbands()), opts, "image")
        img.load()
        if img.mode.startswith("I;16"):
            arr = np.asarray(img).astype(np.uint16)
        elif img.mode == "I":  # 16-bit PNGs on some Pillow versions
            arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        elif img.mode in ("L", "1", "LA"):
            arr = np.asarray(img.convert("L"), dtype=np.uint8)
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return [Image("", arr)]


def read_tiff(raw: bytes, opts: ReadOptions) -> list[Image]:
    """TIFF via tifffile: every page is a slice; 8/16-bit, float, gray or RGB."""
    import tifffile

    pages = []
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        declared = 0
        for page in tif.pages:
            declared += math.prod(page.shape)
            check_size(declared, opts, "TIFF file")
        for page in tif.pages:
            arr = page.asarray()
            if page.axes == "SYX":  # planar RGB: samples first
                arr = np.moveaxis(arr, 0, -1)
            pages.append(arr)
    if not pages:
        raise ValueError("TIFF file has no pages")
    return _slices(pages)


def read_npy(raw: bytes, opts: ReadOptions) -> list[Image]:
    """NPY: a 2-D image, or a 3-D volume cut into 2-D slices along `opts.slice_axis`."""
    check_npy_header(raw, opts)
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    if arr.ndim == 2:
        return [Image("", arr)]
    if arr.ndim != 3:
        raise ValueError(f"array has {arr.ndim} dimensions, expected 2 (image) or 3 (volume)")
    if not -3 <= opts.slice_axis < 3:
        raise ValueError(f"--slice-axis {opts.slice_axis} does not exist in a 3-D volume")
    return _slices(list(np.moveaxis(arr, opts.slice_axis, 0)))


def check_npy_header(raw: bytes, opts: ReadOptions) -> None:
    """Check an NPY header against the bytes that follow it before numpy allocates the array
    it declares (np.load allocates first, then finds out the data is missing)."""
    from numpy.lib import format as npformat

    f = io.BytesIO(raw)
    version = npformat.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = npformat.read_array_header_1_0(f)
    else:
        shape, _, dtype = npformat.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError("array holds Python objects, not pixels")
    count = math.prod(shape)
    check_size(count, opts, "array")
    have = len(raw) - f.tell()
    if have != count * dtype.itemsize:
        raise ValueError(
            f"array of shape {shape} {dtype} needs {count * dtype.itemsize:,} bytes, the file "
            f"holds {have:,} (truncated or padded)"
        )


DICOM_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def read_dicom(raw: bytes, opts: ReadOptions) -> list[Image] | DicomFrames:
    """DICOM via pydicom: rescale applied, default window = stored range. A multi-frame file
    is a volume: its frames ordered by their positions along the slice normal (per-frame
    functional groups; else as stored) and decoded one at a time as they are iterated."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    if str(getattr(ds, "SOPClassUID", "")) == DICOM_WSI:
        raise ValueError(
            "a DICOM whole-slide image (VL Whole Slide Microscopy): not read as a slide yet; "
            "convert it to a pyramidal TIFF (e.g. with wsidicomizer or bfconvert) and ingest that"
        )
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data")
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    rows, columns = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    check_size(rows * columns * frames * samples, opts, "DICOM file")
    if samples > 1:  # colour: 8-bit RGB, no rescale or window
        arr = ds.pixel_array
        return _slices(list(arr) if frames > 1 else [arr])
    return DicomFrames(ds, frames)


class DicomFrames:
    """A DICOM's frames as Images (rescaled, MONOCHROME1 inverted, the stored range as default
    window), decoded one at a time in slice order (io/readers.read_dicom)."""

    def __init__(self, ds, frames: int) -> None:
        self._ds, self._frames = ds, frames
        self._slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        self._intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
        if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
            lo_raw, hi_raw = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo_raw, hi_raw = 0, 2**bits - 1
        lo, hi = sorted(v * self._slope + self._intercept for v in (lo_raw, hi_raw))
        self._invert = (
            (lo + hi)
            if str(getattr(ds, "PhotometricInterpretation", "")) == ("MONOCHROME1")
            else None
        )
        self._window = ((lo + hi) / 2, hi - lo)
        self._order, how = _frame_order(ds, frames)
        self.info = {"frames": frames, "ordered_by": how} if frames > 1 else {}

    def __len__(self) -> int:
        return self._frames

    def __getitem__(self, k: int) -> Image:
        return list(self)[k]

    def __iter__(self):
        from pydicom.pixels import pixel_array

        for k, index in enumerate(self._order):
            frame = (
                self._ds.pixel_array if self._frames == 1 else pixel_array(self._ds, index=index)
            )
            values = frame.astype(np.float64) * self._slope + self._intercept
            if self._invert is not None:
                values = self._invert - values
            suffix = slice_suffix(k) if self._frames > 1 else ""
            yield Image(suffix, values, default_window=self._window)


def _frame_order(ds, frames: int) -> tuple[list[int], str]:
    """A multi-frame DICOM's frames in position order along the slice normal (per-frame
    PlanePositionSequence, orientation shared or per frame), or as stored when it lacks them."""
    if frames < 2:
        return [0], "frame"
    try:
        groups = ds.PerFrameFunctionalGroupsSequence
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        source = shared[0] if shared and "PlaneOrientationSequence" in shared[0] else groups[0]
        cosines = source.PlaneOrientationSequence[0].ImageOrientationPatient
        orientation = [float(v) for v in cosines]
        normal = np.cross(orientation[:3], orientation[3:])
        positions = [groups[k].PlanePositionSequence[0].ImagePositionPatient for k in range(frames)]
        depth = [float(np.dot([float(v) for v in p], normal)) for p in positions]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return list(range(frames)), "frame"
    if not all(np.isfinite(depth)):
        return list(range(frames)), "frame"
    return [int(i) for i in np.argsort(depth, kind="stable")], "position"


NIFTI_HEADER_BYTES = 348  # a NIfTI-1 header; NIfTI-2's is 540
NIFTI_MAX_HEADER_BYTES = 1 << 20  # header and extensions read before any voxel


def read_nifti(raw: bytes, opts: ReadOptions) -> NiftiSlices:
    """NIfTI-1/2 (.nii, .nii.gz) via nibabel's header: a 2-D image, or a 3-D volume cut into
    slices along its third (k) axis in the file's own voxel order, scl_slope / scl_inter
    applied. The header's dimensions are checked against the budget before a voxel is
    decompressed or allocated; the slices are then read one slab at a time as they are
    iterated (a .nii.gz is decompressed as a stream, never whole), and only the bytes the
    header declares are ever decompressed (a small .nii.gz can hold gigabytes)."""
    import nibabel as nib

    head = _gunzip_prefix(raw, NIFTI_MAX_HEADER_BYTES)
    version = _nifti_version(head)
    header_class = nib.Nifti2Header if version == 2 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(head), check=False)
    shape = tuple(int(d) for d in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1:  # a 4-D file of one volume
        shape = shape[:-1]
    if not 2 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(f"NIfTI image of shape {shape}: expected a 2-D image or a 3-D volume")
    check_size(math.prod(shape), opts, "NIfTI file")
    return NiftiSlices(raw, header, shape)


class NiftiSlices:
    """A NIfTI's slices, read a slab at a time in order (io/readers.read_nifti); `info` keeps
    the affine and axis codes for the scan's record."""

    def __init__(self, raw: bytes, header, shape: tuple[int, ...]) -> None:
        import nibabel as nib

        self._raw, self._shape = raw, shape
        self._offset = int(header.get_data_offset())
        self._dtype = header.get_data_dtype()
        slope, inter = header.get_slope_inter()
        slope = 1.0 if slope is None or slope == 0 else float(slope)  # 0: unscaled (the spec)
        inter = 0.0 if inter is None else float(inter)
        # as nibabel's own proxy: values keep their type unless the scaling changes them
        self._scale = None if (slope, inter) == (1.0, 0.0) else (slope, inter)
        affine = header.get_best_affine()
        self.info = {
            "affine": [[round(float(v), 6) for v in row] for row in affine],
            "axis_codes": list(nib.aff2axcodes(affine)),
            "voxel_order": "i, j: rows, columns of each slice; k: the slices",
        }

    def __len__(self) -> int:
        return self._shape[2] if len(self._shape) == 3 else 1

    def __getitem__(self, k: int) -> Image:
        return list(self)[k]

    def __iter__(self):
        import gzip

        rows, cols = self._shape[:2]
        slab = rows * cols * self._dtype.itemsize
        raw = io.BytesIO(self._raw)
        with gzip.GzipFile(fileobj=raw) if self._raw[:2] == b"\x1f\x8b" else raw as f:
            if len(f.read(self._offset)) < self._offset:
                raise ValueError("NIfTI file ends before its data")
            for k in range(len(self)):
                data = f.read(slab)
                if len(data) < slab:
                    raise ValueError(f"NIfTI data of shape {self._shape} ends at slice {k}")
                # i varies fastest in the file: a slab is (j, i) in C order
                values = np.frombuffer(data, self._dtype).reshape(cols, rows).T
                if self._scale is not None:
                    values = values.astype(np.float64) * self._scale[0] + self._scale[1]
                yield Image(slice_suffix(k) if len(self) > 1 else "", values)


def _nifti_version(head: bytes) -> int:
    """1 or 2, from sizeof_hdr (348 or 540, in either byte order)."""
    size = int.from_bytes(head[:4], "little")
    return 2 if size == 540 or int.from_bytes(head[:4], "big") == 540 else 1


def _gunzip_prefix(raw: bytes, limit: int) -> bytes:
    """The first `limit` bytes of `raw`, decompressed if it is gzip: never more."""
    import gzip

    if raw[:2] != b"\x1f\x8b":
        return raw[:limit]
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        return f.read(limit)


READERS: dict[str, Reader] = {
    ".png": read_pil,
    ".jpg": read_pil,
    ".jpeg": read_pil,
    ".tif": read_tiff,
    ".tiff": read_tiff,
    ".npy": read_npy,
    ".dcm": read_dicom,
    ".dicom": read_dicom,
    ".nii": read_nifti,
    ".nii.gz": read_nifti,
}
COMPOUND_SUFFIXES = (".nii.gz",)


def suffix_of(name: str) -> str:
    """A file name's format suffix, lower case: ".png", ".nii.gz", or "" for none."""
    lower = posixpath.basename(name).lower()
    for compound in COMPOUND_SUFFIXES:
        if lower.endswith(compound) and len(lower) > len(compound):
            return compound
    return posixpath.splitext(lower)[1]


def normalisation_of(dtype: str, window: tuple[float, float] | None) -> dict:
    """The record kept with a table: compared between a table and its model."""
    return {"dtype": dtype, "window": None if window is None else [float(w) for w in window]}


def to_stored(img: Image, opts: ReadOptions) -> tuple[np.ndarray, dict]:
    """An image's values -> (stored pixels (H, W, C) uint8/uint16/float32, normalisation)."""
    values = img.values
    if values.ndim == 3 and values.shape[2] in (2, 4):  # drop alpha
        values = values[:, :, : values.shape[2] - 1]
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3 or values.shape[2] not in (1, 3):
        raise ValueError(f"image of shape {img.values.shape} is neither gray nor RGB")
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():  # no window or scale maps them to a pixel value
            raise ValueError(f"{int((~finite).sum())} pixels are NaN or infinite")
    window = opts.window or img.default_window
    if window is not None:
        center, width = window
        if not width > 0:
            raise ValueError(f"window width must be > 0, got {width}")
        scaled = (values.astype(np.float64) - (center - width / 2)) / width
        stored = np.rint(np.clip(scaled, 0.0, 1.0) * 65535.0).astype(np.uint16)
        return stored, normalisation_of("uint16", window)
    if values.dtype == np.bool_:
        values = values.astype(np.uint8) * 255
    if values.dtype in (np.uint8, np.uint16):
        return values, normalisation_of(values.dtype.name, None)
    if np.issubdtype(values.dtype, np.floating):
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            return values.astype(np.float32), normalisation_of("float32", None)
        raise ValueError(
            f"float pixels span [{lo:g}, {hi:g}], outside [0, 1]; pass --window CENTER,WIDTH"
        )
    if np.issubdtype(values.dtype, np.integer):
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 65535:
            return values.astype(np.uint16), normalisation_of("uint16", None)
        raise ValueError(
            f"{values.dtype} pixels span [{lo}, {hi}], beyond uint16; pass --window CENTER,WIDTH"
        )
    raise ValueError(f"pixel type {values.dtype} is not supported")
