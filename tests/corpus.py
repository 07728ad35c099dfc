"""A generator of malformed inputs, written fresh by the tests (no binaries in the repository).

`ingest_corpus(root)` writes scan files that are truncated, corrupt, decompression bombs,
misnamed, empty, oddly named, linked in loops, special or unreadable, beside a few good ones;
`score_tables(root, images)` writes patch tables that `score` must refuse (exit 2) and one whose
bad rows it must quarantine. Each case comes with what the product must do with it.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Case:
    """What ingest must do with one file: take it (`reason` None) or quarantine it with a
    reason matching `reason` (a regex); `either` for corrupt files that may still decode."""

    reason: str | None
    either: bool = False


# ---- valid scans of every format -------------------------------------------------------------


def write_dicom(path, pixels: np.ndarray, *, slope=1.0, intercept=0.0, bits=12, pixel_data=True):
    """A minimal valid CT-like DICOM file written by pydicom."""
    from anogan_batch.evaluation.volume_bench import ct_dataset

    ds = ct_dataset(pixels, slope=slope, intercept=intercept, bits=bits, pixel_data=pixel_data)
    ds.save_as(path, enforce_file_format=True)


def valid_files(size: int = 32, seed: int = 0) -> dict[str, bytes]:
    """Extension -> the bytes of a small valid scan in that format."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size), dtype=np.uint8)
    out = {}
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        out[ext] = buf.getvalue()
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    out[".tif"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, img)
    out[".npy"] = buf.getvalue()
    buf = io.BytesIO()
    write_dicom(buf, img.astype(np.uint16) * 16)
    out[".dcm"] = buf.getvalue()
    out[".nii"] = nifti_bytes(img)
    out[".nii.gz"] = gzip.compress(out[".nii"])
    return out


def nifti_bytes(values: np.ndarray, slope: float | None = None) -> bytes:
    """A NIfTI-1 image or volume as nibabel writes it (identity affine)."""
    import nibabel as nib

    image = nib.Nifti1Image(values, np.eye(4))
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    return image.to_bytes()


def nifti_bombs() -> dict[str, bytes]:
    """A .nii whose header declares 100,000 x 100,000 x 10 voxels over 16 bytes of data, and a
    .nii.gz of 4 x 4 x 4 declared voxels followed by 200 MB of zeros (1 MB compressed)."""
    head = bytearray(nifti_bytes(np.zeros((4, 4, 4), np.uint8)))
    # dim[0..3] sit at byte 40 of the header: (rank, x, y, z) as int16
    head[40:48] = struct.pack("<hhhh", 3, 32_000, 32_000, 10)
    honest = nifti_bytes(np.zeros((4, 4, 4), np.uint8))
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    tail = b"".join(z.compress(b"\0" * 2**20) for _ in range(200)) + z.flush()
    return {
        ".nii": bytes(head[: len(honest) - 48]),
        ".nii.gz": gzip.compress(honest) + tail,  # gzip members, one stream to gunzip
    }


# ---- decompression bombs ---------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20_000) -> bytes:
    """An honest PNG of side x side black pixels: ~400 kB that decode to side^2 bytes."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + a row of zeros
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def npy_bomb() -> bytes:
    """An NPY header declaring a 100,000 x 100,000 array over 10 bytes of data."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (100000, 100000), }"
    header = header.ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 10


def tiff_bomb() -> bytes:
    """A little-endian TIFF whose one page declares 100,000 x 100,000 uncompressed pixels."""
    tags = [  # (tag, type SHORT=3 / LONG=4, value)
        (256, 4, 100_000),  # ImageWidth
        (257, 4, 100_000),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # Photometric: min-is-black
        (273, 4, 8),  # StripOffsets
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, 100_000),  # RowsPerStrip
        (279, 4, 16),  # StripByteCounts
    ]
    ifd_offset = 8 + 16
    ifd = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        ifd += struct.pack("<HHII", tag, typ, 1, value)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + b"\0" * 16 + ifd


def jpeg_bomb(valid_jpeg: bytes) -> bytes:
    """A valid JPEG whose frame header (SOF0) now claims 65,500 x 65,500 pixels."""
    i = valid_jpeg.index(b"\xff\xc0")
    return valid_jpeg[: i + 5] + struct.pack(">HH", 65_500, 65_500) + valid_jpeg[i + 9 :]


def dicom_bomb(path) -> None:
    """A DICOM whose header declares 1,000 frames of 65,535 x 65,535 over 8 bytes of pixels."""
    write_dicom(path, np.zeros((2, 2), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65_535, 65_535, 1_000
    ds.save_as(path)


# ---- the ingest corpus -----------------------------------------------------------------------


def ingest_corpus(root: Path, *, unreadable: bool = True) -> dict[str, Case]:
    """Write the corpus under root; -> {name relative to root (as ingest prints it): Case}.

    `unreadable`: add a file and a folder with no permissions (only meaningful when the
    ingest runs without root's capability to read anything).
    """
    good = valid_files()
    cases: dict[str, Case] = {}

    def put(name: str, data: bytes, case: Case) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases[name] = case

    for ext, data in good.items():  # one stem per format: 'a.png' and 'a.npy' share a scan_id
        stem = ext[1:]
        put(f"good/{stem}{ext}", data, Case(None))
        put(f"truncated/{stem}{ext}", data[: len(data) // 2], Case("unreadable"))
        corrupt = bytearray(data)
        corrupt[len(data) // 3 : len(data) // 3 + 40] = os.urandom(40)
        put(f"corrupt/{stem}{ext}", bytes(corrupt), Case("unreadable", either=True))
        put(f"empty/{stem}{ext}", b"", Case("0 bytes"))
        put(f"garbage/{stem}{ext}", os.urandom(300), Case("unreadable|no pixel data"))
    put("bomb/honest.png", png_bomb(), Case("declares 400,000,000 values"))
    put("bomb/npy.npy", npy_bomb(), Case("declares 10,000,000,000 values"))
    put("bomb/tif.tif", tiff_bomb(), Case("declares 10,000,000,000 values"))
    put("bomb/jpg.jpg", jpeg_bomb(good[".jpg"]), Case("declares 4,290,250,000 values"))
    bombs = nifti_bombs()
    put("bomb/nii.nii", bombs[".nii"], Case("declares 10,240,000,000 values"))
    (root / "bomb").mkdir(exist_ok=True)
    dicom_bomb(root / "bomb" / "dcm.dcm")
    cases["bomb/dcm.dcm"] = Case("declares 4,294,836,225,000 values")
    put("wrong_ext/png_named.npy", good[".png"], Case("unreadable"))
    put("wrong_ext/npy_named.png", good[".npy"], Case("unreadable"))
    put("wrong_ext/text_named.dcm", b"hello, not a scan\n" * 20, Case("unreadable|no pixel data"))
    put("wrong_ext/jpg_named.tif", good[".jpg"], Case("unreadable"))
    put("wrong_ext/notes.txt", b"hello", Case("unsupported format '.txt'"))
    put("wrong_ext/no_extension", good[".png"], Case(r"unsupported format '\(none\)'"))
    odd = {
        "empty_array.npy": (np.zeros((0, 10), np.uint8), "zero-size|smaller than"),
        "four_d.npy": (np.zeros((2, 2, 2, 2), np.uint8), "4 dimensions"),
        "complex.npy": (np.zeros((32, 32), np.complex64), "not supported"),
        "strings.npy": (np.array([["a"] * 32] * 32), "not supported"),
        "tiny.npy": (np.zeros((8, 8), np.uint8), "smaller than the 16px patch"),
        "nan.npy": (np.full((32, 32), np.nan, np.float32), "1024 pixels are NaN"),
    }
    for name, (array, reason) in odd.items():
        buf = io.BytesIO()
        np.save(buf, array)
        put(f"odd/{name}", buf.getvalue(), Case(reason))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    put("odd/pickled.npy", buf.getvalue(), Case("objects"))

    # names
    long_name = "n" * 240 + ".png"
    put(f"names/{long_name}", good[".png"], Case(None))
    put("names/ünïcødé ✓.png", good[".png"], Case(None))
    put("names/same.npy", good[".npy"], Case(None))  # first by name keeps the id
    put("names/same.png", good[".png"], Case("already the id of 'names/same.npy'"))
    put("names/vol.npy", good[".npy"], Case(None))
    put("names/vol@0001.png", good[".png"], Case("may be a slice id of volume 'names/vol.npy'"))
    raw_name = os.fsencode(root / "names") + b"/latin1-\xe9t\xe9.png"
    with open(raw_name, "wb") as f:
        f.write(good[".png"])
    cases["names/latin1-\\xe9t\\xe9.png"] = Case(None)

    # links and special files
    (root / "links").mkdir()
    os.symlink("loop.png", root / "links" / "loop.png")
    cases["links/loop.png"] = Case("link loop")
    os.symlink("nowhere.png", root / "links" / "dangling.png")
    cases["links/dangling.png"] = Case("No such file")
    os.symlink("..", root / "links" / "up")
    cases["links/up"] = Case("a link to a folder listed already")
    os.symlink("../good/png.png", root / "links" / "alias.png")  # a file link is followed
    cases["links/alias.png"] = Case(None)
    os.mkfifo(root / "links" / "fifo.png")
    cases["links/fifo.png"] = Case("not a regular file")

    if unreadable:
        put("perms/locked.png", good[".png"], Case("Permission denied"))
        os.chmod(root / "perms" / "locked.png", 0)
        put("perms/locked_dir/inside.png", good[".png"], Case(None))
        del cases["perms/locked_dir/inside.png"]  # never listed: its folder is
        os.chmod(root / "perms" / "locked_dir", 0)
        cases["perms/locked_dir"] = Case("folder cannot be listed: Permission denied")
    return cases


# ---- the score corpus ------------------------------------------------------------------------


def _table(ids, images, *, scan_ids=None, x=None, y=None, **extra):
    import pyarrow as pa

    n = len(ids)
    cols = {
        "patch_id": pa.array(ids, pa.string()),
        "scan_id": pa.array(scan_ids or [f"s{i}" for i in range(n)], pa.string()),
        "x": pa.array(x or [0] * n, pa.int32()),
        "y": pa.array(y or [0] * n, pa.int32()),
        "image": pa.array(images, pa.binary()),
    }
    return pa.table(cols | extra)


def _write(path: Path, *tables) -> Path:
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    for k, t in enumerate(tables):
        pq.write_table(t, path / f"part-{k}.parquet")
    return path


def refused_tables(root: Path, images: list[bytes]) -> dict[str, tuple[Path, str]]:
    """Patch tables `score` must refuse before scoring: {case: (table, regex of the message)}."""
    import pyarrow as pa

    n = len(images)
    ids = [f"p{i}" for i in range(n)]
    good = _table(ids, images)
    cases: dict[str, tuple[Path, str]] = {}
    x_text = good.set_column(2, "x", pa.array(["0"] * n))
    for name, regex, tables in [
        ("x_as_string", r"column 'x' must be integer, found string", [x_text]),
        (
            "image_as_string",
            r"column 'image' must be binary",
            [good.set_column(4, "image", pa.array(["x"] * n))],
        ),
        (
            "patch_id_as_int",
            r"column 'patch_id' must be string",
            [good.set_column(0, "patch_id", pa.array(range(n)))],
        ),
        (
            "patch_id_all_null_typed",
            r"column 'patch_id' is null in every row",
            [good.set_column(0, "patch_id", pa.nulls(n))],
        ),
        (
            "patch_id_nulls",
            r"2 row\(s\) have a null patch_id",
            [good.set_column(0, "patch_id", pa.array([None, None, *ids[2:]]))],
        ),
        (
            "duplicate_ids",
            r"2 patch_id\(s\) appear more than once, e\.g\. 'p0' \(3 rows\), 'p1' \(2 rows\)",
            [good.set_column(0, "patch_id", pa.array(["p0", "p0", "p0", "p1", "p1", *ids[5:]]))],
        ),
        (
            "duplicates_across_files",
            r"1 patch_id\(s\) appear more than once, e\.g\. 'p1'",
            [good.slice(0, 3), good.slice(1, 1)],
        ),
        ("zero_rows", r"is empty: nothing to score", [good.slice(0, 0)]),
        ("missing_image", r"has no column 'image'", [good.drop_columns(["image"])]),
        (
            "mixed_schema",
            r"part-1\.parquet.*column 'x' must be integer",
            [good.slice(0, 4), x_text.slice(4)],
        ),
    ]:
        cases[name] = (_write(root / name, *tables), regex)
    bad_footer = _write(root / "corrupt_footer", good)
    data = (bad_footer / "part-0.parquet").read_bytes()
    (bad_footer / "part-0.parquet").write_bytes(data[:-12] + b"\0" * 8 + b"PAR1")
    cases["corrupt_footer"] = (bad_footer, r"part-0\.parquet")
    not_parquet = root / "not_parquet"
    not_parquet.mkdir()
    (not_parquet / "part-0.parquet").write_bytes(b"this is no parquet file")
    cases["not_parquet"] = (not_parquet, r"part-0\.parquet")
    no_files = root / "no_files"
    no_files.mkdir()
    (no_files / "readme.txt").write_text("no table here")
    cases["no_files"] = (no_files, r"holds no Parquet files")
    return cases


HOSTILE_SCAN_IDS = [
    "../../escaped",
    "../../../../../../../../tmp/anogan-corpus-escape",
    "/anogan-corpus-absolute/x",
    "nul\x00byte",
    "ctrl\x01\x1b[31m",
    "a" * 1200,
    "名前/スキャン",
    "",
    "back\\..\\..\\slash",
    "<script>alert(1)</script>",
]


def quarantine_table(root: Path, images: list[bytes], size: int) -> tuple[Path, dict]:
    """A patch table in two files of different (compatible) schemas, mixing good rows, rows
    `score` must quarantine and rows with hostile scan_ids that it must score safely.
    -> (table, {patch_id: regex of its quarantine reason, or None when it is scored})."""
    import pyarrow as pa

    good = images[0]
    rows = [  # (patch_id, scan_id, x, y, image, reason)
        ("ok-0", "scan-ok", 0, 0, good, None),
        ("ok-1", "scan-ok", size, 0, images[1], None),
        ("neg-x", "scan-neg", -5, 0, good, r"x is -5, outside 0\.\.2147483647"),
        ("null-y", "scan-null-y", 0, None, good, r"y is null"),
        ("null-scan", None, 0, 0, good, r"scan_id is null"),
        ("null-image", "scan-ni", 0, 0, None, r"image is null"),
        ("short-image", "scan-si", 0, 0, good[:-1], r"image has \d+ bytes"),
        ("long-image", "scan-li", 0, 0, good + b"\0", r"image has \d+ bytes"),
        ("huge-x", "scan-huge", 2**31 - 1 - size, 0, good, None),  # scored; a coarse heatmap
    ]
    rows += [(f"hostile-{k}", s, 0, 0, good, None) for k, s in enumerate(HOSTILE_SCAN_IDS)]
    first = pa.table(
        {
            "patch_id": [r[0] for r in rows],
            "scan_id": pa.array([r[1] for r in rows], pa.string()),
            "x": pa.array([r[2] for r in rows], pa.int32()),
            "y": pa.array([r[3] for r in rows], pa.int32()),
            "image": pa.array([r[4] for r in rows], pa.binary()),
            "label": pa.array(["0"] * len(rows)),
        }
    )
    expected = {r[0]: r[5] for r in rows}
    # the second file: x as int64 beyond int32, no label column, a null-typed dtype column,
    # wrong shape and dtype values, and a column nobody asked for
    second = pa.table(
        {
            "patch_id": ["far-x", "bad-dtype", "bad-shape", "null-shape", "extra-ok"],
            "scan_id": ["scan-far", "scan-bd", "scan-bs", "scan-ns", "scan-extra"],
            "x": pa.array([3_000_000_000, 0, 0, 0, 0], pa.int64()),
            "y": pa.array([0] * 5, pa.int64()),
            "image": pa.array([good] * 5, pa.binary()),
            "height": pa.array([size, size, 2 * size, None, size], pa.int32()),
            "width": pa.array([size, size, size // 2, None, size], pa.int32()),
            "channels": pa.array([1, 1, 1, None, 1], pa.int32()),
            "dtype": ["uint8", "object", "uint8", None, "uint8"],
            "comment": ["not", "a", "contract", "column", "!"],
        }
    )
    expected |= {
        "far-x": r"x is 3000000000, outside",
        "bad-dtype": r"pixel dtype object, model expects uint8",
        "bad-shape": rf"patch is {2 * size}x{size // 2}x1",
        "null-shape": None,  # the row does not say its shape: checked by byte length
        "extra-ok": None,
    }
    return _write(root / "quarantine_table", first, second), expected
