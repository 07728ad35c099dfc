"""Scan files -> patch table.

Every file under SRC whose extension has a reader is cut into P x P patches on a grid of stride
S; when the grid does not reach the right or bottom border, one more row/column of patches flush
with the border is added so every pixel is covered (heatmaps need full coverage).

Readers live in `READERS`: a function from file bytes to a list of (suffix, pixels) pairs,
pixels (H, W, C) uint8/uint16/float32. A 2-D format returns one pair with suffix ""; a volume
returns one per slice. New formats are one function and one line in that table.

Files that cannot be read (corrupt, unsupported, smaller than a patch) are not fatal: they are
written to OUT/_quarantine.parquet with the reason and counted in OUT/_ingest.json. Ingest
fails (exit 2) only when nothing at all could be read.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from anogan_batch import storage
from anogan_batch.config import check_int
from anogan_batch.errors import InputError
from anogan_batch.patches import PATCH_SCHEMA, encode_pixels, patch_id_for

Reader = Callable[[bytes], list[tuple[str, np.ndarray]]]


def read_pil(raw: bytes) -> list[tuple[str, np.ndarray]]:
    """PNG / JPEG via Pillow: 8-bit gray or RGB, 16-bit gray; alpha and palettes dropped."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.uint16 if img.mode != "I" else np.int32)
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        elif img.mode in ("L", "1") or img.mode == "LA":
            arr = np.asarray(img.convert("L"), dtype=np.uint8)
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return [("", arr)]


READERS: dict[str, Reader] = {
    ".png": read_pil,
    ".jpg": read_pil,
    ".jpeg": read_pil,
}


@dataclass(frozen=True)
class IngestConfig:
    patch_size: int
    stride: int | None = None  # None: the patch size (non-overlapping grid)
    label_from_parent: bool = False
    rows_per_file: int = 50_000  # target rows per output Parquet file

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size, min_value=4)
        if self.stride is not None:
            check_int("stride", self.stride, min_value=1)
        check_int("rows_per_file", self.rows_per_file, min_value=1)

    @property
    def step(self) -> int:
        return self.stride or self.patch_size


@dataclass
class IngestSummary:
    files: int = 0
    scans: int = 0
    patches: int = 0
    quarantined_files: int = 0
    params: dict = field(default_factory=dict)


def grid_positions(length: int, patch: int, step: int) -> list[int]:
    """Top-left offsets along one axis; the last patch sits flush with the border."""
    positions = list(range(0, length - patch + 1, step))
    if positions and positions[-1] != length - patch:
        positions.append(length - patch)
    return positions


def cut_patches(pixels: np.ndarray, patch: int, step: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (x, y, patch (P, P, C)) over the grid of a (H, W, C) scan."""
    h, w = pixels.shape[:2]
    for y in grid_positions(h, patch, step):
        for x in grid_positions(w, patch, step):
            yield x, y, pixels[y : y + patch, x : x + patch]


def scan_id_for(src: str, path: str) -> str:
    """The file's path relative to SRC, without extension, with '/' separators."""
    rel = path[len(src.rstrip("/")) + 1 :] if path != src else posixpath.basename(path)
    rel = rel.replace("\\", "/")
    return rel.rsplit(".", 1)[0] if "." in posixpath.basename(rel) else rel


def label_for(src: str, path: str) -> str:
    parent = posixpath.dirname(path.replace("\\", "/"))
    return posixpath.basename(parent) or posixpath.basename(src.rstrip("/"))


class _TableWriter:
    """Streams rows into numbered Parquet files of about `rows_per_file` rows each."""

    def __init__(self, out: str, rows_per_file: int) -> None:
        self.out, self.rows_per_file = out, rows_per_file
        self.columns: dict[str, list] = {name: [] for name in PATCH_SCHEMA.names}
        self.files = 0

    def add(self, row: dict) -> None:
        for k, v in row.items():
            self.columns[k].append(v)
        if len(self.columns["patch_id"]) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.columns["patch_id"]:
            return
        table = pa.table(self.columns, schema=PATCH_SCHEMA)
        fs, inner = storage.filesystem_for(storage.join(self.out, f"part-{self.files:05d}.parquet"))
        storage.makedirs(self.out)
        with fs.open_output_stream(inner) as f:
            pq.write_table(table, f, compression="zstd")
        self.files += 1
        self.columns = {name: [] for name in PATCH_SCHEMA.names}


def ingest(src: str, out: str, cfg: IngestConfig) -> IngestSummary:
    """Cut every scan under SRC into patches and write the patch table to OUT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not storage.exists(src) and not storage.is_dir(src):
        raise InputError(f"scan source '{src}' does not exist")
    files = storage.list_files(src)
    if not files:
        raise InputError(f"scan source '{src}' holds no files")
    summary = IngestSummary(params={"src": src, **asdict(cfg)})
    writer = _TableWriter(out, cfg.rows_per_file)
    quarantine: list[tuple[str, str]] = []
    for path in files:
        summary.files += 1
        ext = posixpath.splitext(path)[1].lower()
        reader = READERS.get(ext)
        if reader is None:
            quarantine.append((path, f"unsupported format '{ext or '(none)'}'"))
            continue
        try:
            raw = storage.read_bytes(path)
            if not raw:
                raise ValueError("file is empty (0 bytes)")
            images = reader(raw)
        except Exception as e:  # any decoder error means this one file is unreadable
            quarantine.append((path, f"unreadable {ext} file: {e}"))
            continue
        base_id = scan_id_for(src, path)
        label = label_for(src, path) if cfg.label_from_parent else None
        for suffix, pixels in images:
            h, w, c = pixels.shape
            if h < cfg.patch_size or w < cfg.patch_size:
                quarantine.append(
                    (path + suffix, f"image is {h}x{w}, smaller than the {cfg.patch_size}px patch")
                )
                continue
            scan_id = base_id + suffix
            summary.scans += 1
            for x, y, patch in cut_patches(pixels, cfg.patch_size, cfg.step):
                writer.add(
                    {
                        "patch_id": patch_id_for(scan_id, x, y, cfg.patch_size),
                        "scan_id": scan_id,
                        "x": x,
                        "y": y,
                        "image": encode_pixels(patch),
                        "height": cfg.patch_size,
                        "width": cfg.patch_size,
                        "channels": c,
                        "dtype": patch.dtype.name,
                        "label": label,
                    }
                )
                summary.patches += 1
    writer.flush()
    summary.quarantined_files = len(quarantine)
    if quarantine:
        table = pa.table({"path": [q[0] for q in quarantine], "reason": [q[1] for q in quarantine]})
        fs, inner = storage.filesystem_for(storage.join(out, "_quarantine.parquet"))
        storage.makedirs(out)
        with fs.open_output_stream(inner) as f:
            pq.write_table(table, f)
    if summary.patches == 0:
        first = quarantine[0] if quarantine else (src, "no patches")
        raise InputError(
            f"ingest of '{src}' produced no patches: {len(quarantine)} file(s) could not be "
            f"used; first: '{first[0]}': {first[1]}"
        )
    storage.write_json(storage.join(out, "_ingest.json"), asdict(summary))
    return summary
