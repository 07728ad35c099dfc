"""Scan files -> patch table, in parallel on Ray Data over the file list.

Every file under SRC whose extension has a reader (see `readers.READERS`) is read, its values
normalised for storage (`readers.to_stored`), and cut into P x P patches on a grid of stride S.
When the grid does not reach the right or bottom border, one more row/column of patches flush
with the border is added, so every pixel is covered (heatmaps need full coverage). With
`min_foreground`, patches whose share of Otsu-foreground pixels is below it are skipped, as the
paper scores only patches inside the retina.

Work is split into chunks of files. A chunk writes its own Parquet parts, named after its first
file, so a retried chunk overwrites rather than duplicates. Each chunk returns one small row per
scan (or per unreadable file), which the driver writes as OUT/_scans.parquet (scan geometry,
for heatmaps) and OUT/_quarantine.parquet (path and reason); OUT/_ingest.json holds the counts
and the table's pixel normalisation, checked again at train and score time. Ingest fails (exit
2) only when nothing at all could be read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from anogan_batch import storage
from anogan_batch.config import check_choice, check_float, check_int
from anogan_batch.errors import InputError
from anogan_batch.patches import PATCH_SCHEMA, encode_pixels, patch_id_for
from anogan_batch.readers import READERS, ReadOptions, foreground_mask, to_stored

ENGINES = ("auto", "local", "ray")
AUTO_RAY_FILES = 256  # `auto` uses Ray above this many files (or when RAY_ADDRESS is set)
SCAN_FIELDS = (
    "path", "scan_id", "label", "height", "width", "channels", "dtype",
    "n_patches", "n_skipped", "normalisation", "reason",
)  # fmt: skip


@dataclass(frozen=True)
class IngestConfig:
    patch_size: int
    stride: int | None = None  # None: the patch size (non-overlapping grid)
    label_from_parent: bool = False
    rows_per_file: int = 50_000  # target rows per output Parquet file
    slice_axis: int = 0
    window: tuple[float, float] | None = None  # (center, width), source units
    min_foreground: float = 0.0  # skip patches with less Otsu foreground than this
    engine: str = "auto"

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size, min_value=4)
        if self.stride is not None:
            check_int("stride", self.stride, min_value=1)
        check_int("rows_per_file", self.rows_per_file, min_value=1)
        check_choice("slice_axis", self.slice_axis, (-3, -2, -1, 0, 1, 2))
        check_float("min_foreground", self.min_foreground, low=0.0, high=1.0)
        check_choice("engine", self.engine, ENGINES)
        if self.window is not None:
            check_float("window center", self.window[0])
            check_float("window width", self.window[1], low=0.0, low_open=True)

    @property
    def step(self) -> int:
        return self.stride or self.patch_size

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(slice_axis=self.slice_axis, window=self.window)


@dataclass
class IngestSummary:
    files: int = 0
    scans: int = 0
    patches: int = 0
    skipped_patches: int = 0  # below --min-foreground
    quarantined: int = 0  # files or slices that could not be used
    normalisation: list = field(default_factory=list)
    engine: str = "local"
    seconds: float = 0.0
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


def _scan_row(path: str, **values) -> dict:
    row = dict.fromkeys(SCAN_FIELDS)
    row.update({"path": path, "n_patches": 0, "n_skipped": 0, **values})
    return row


def process_file(path: str, src: str, cfg: IngestConfig) -> tuple[list[dict], list[dict]]:
    """One scan file -> (patch rows, one scan row per image or a row with the reason)."""
    ext = posixpath.splitext(path)[1].lower()
    reader = READERS.get(ext)
    if reader is None:
        return [], [_scan_row(path, reason=f"unsupported format '{ext or '(none)'}'")]
    try:
        raw = storage.read_bytes(path)
        if not raw:
            raise ValueError("file is empty (0 bytes)")
        images = reader(raw, cfg.read_options)
    except Exception as e:  # any decoder error means this one file is unreadable
        return [], [_scan_row(path, reason=f"unreadable {ext} file: {e}")]
    base_id = scan_id_for(src, path)
    label = label_for(src, path) if cfg.label_from_parent else None
    size = cfg.patch_size
    rows: list[dict] = []
    scans: list[dict] = []
    for img in images:
        scan_id = base_id + img.suffix
        try:
            pixels, norm = to_stored(img, cfg.read_options)
        except ValueError as e:
            scans.append(_scan_row(path + img.suffix, scan_id=scan_id, reason=str(e)))
            continue
        h, w, c = pixels.shape
        if h < size or w < size:
            reason = f"image is {h}x{w}, smaller than the {size}px patch"
            scans.append(_scan_row(path + img.suffix, scan_id=scan_id, reason=reason))
            continue
        mask = foreground_mask(pixels) if cfg.min_foreground > 0 else None
        n_patches = n_skipped = 0
        for x, y, patch in cut_patches(pixels, size, cfg.step):
            if mask is not None and mask[y : y + size, x : x + size].mean() < cfg.min_foreground:
                n_skipped += 1
                continue
            rows.append(
                {
                    "patch_id": patch_id_for(scan_id, x, y, size),
                    "scan_id": scan_id,
                    "x": x,
                    "y": y,
                    "image": encode_pixels(patch),
                    "height": size,
                    "width": size,
                    "channels": c,
                    "dtype": patch.dtype.name,
                    "label": label,
                }
            )
            n_patches += 1
        scans.append(
            _scan_row(
                path + img.suffix,
                scan_id=scan_id,
                label=label,
                height=h,
                width=w,
                channels=c,
                dtype=pixels.dtype.name,
                n_patches=n_patches,
                n_skipped=n_skipped,
                normalisation=json.dumps(norm, sort_keys=True),
            )
        )
    return rows, scans


def _write_part(out: str, name: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=PATCH_SCHEMA)
    fs, inner = storage.filesystem_for(storage.join(out, name))
    with fs.open_output_stream(inner) as f:
        pq.write_table(table, f, compression="zstd")


def ingest_chunk(paths: list[str], src: str, out: str, cfg: IngestConfig) -> list[dict]:
    """Ingest a chunk of files: write its parts, return its scan rows. Idempotent."""
    key = hashlib.sha1(paths[0].encode()).hexdigest()[:16]
    pending: list[dict] = []
    scans: list[dict] = []
    parts = 0
    for path in paths:
        rows, file_scans = process_file(path, src, cfg)
        pending.extend(rows)
        scans.extend(file_scans)
        while len(pending) >= cfg.rows_per_file:
            _write_part(out, f"part-{key}-{parts:04d}.parquet", pending[: cfg.rows_per_file])
            pending, parts = pending[cfg.rows_per_file :], parts + 1
    if pending:
        _write_part(out, f"part-{key}-{parts:04d}.parquet", pending)
    return scans


def _ray_ingest_batch(batch: dict, src: str, out: str, cfg: IngestConfig):
    import pyarrow as pa

    scans = ingest_chunk([str(p) for p in batch["path"]], src, out, cfg)
    return pa.Table.from_pylist(scans, schema=_scan_schema())


def _scan_schema():
    import pyarrow as pa

    ints = ("height", "width", "channels", "n_patches", "n_skipped")
    return pa.schema([(f, pa.int64() if f in ints else pa.string()) for f in SCAN_FIELDS])


def _use_ray(cfg: IngestConfig, n_files: int) -> bool:
    if cfg.engine != "auto":
        return cfg.engine == "ray"
    return n_files > AUTO_RAY_FILES or bool(os.environ.get("RAY_ADDRESS"))


def _run_chunks(files: list[str], src: str, out: str, cfg: IngestConfig, use_ray: bool) -> list:
    if not use_ray:
        return ingest_chunk(files, src, out, cfg)
    import pyarrow as pa
    import ray
    import ray.data

    from anogan_batch.pipeline import connect_ray, quiet_ray_data

    connect_ray()
    quiet_ray_data()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    # several chunks per CPU so a slow file does not leave the rest idle
    n_chunks = max(1, min(len(files), 4 * cpus))
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=n_chunks)
    ds = ds.map_batches(
        _ray_ingest_batch,
        fn_args=(src, out, cfg),
        batch_size=math.ceil(len(files) / n_chunks),
        batch_format="numpy",
        num_cpus=1,
    )
    tables = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(tables).to_pylist() if tables else []


def _prepare_out(out: str) -> None:
    """OUT must be new, empty, or an earlier ingest's output (which is then replaced)."""
    if storage.exists(storage.join(out, "_ingest.json")):
        storage.delete(out)
    elif storage.is_dir(out) and storage.list_files(out):
        raise InputError(
            f"ingest output '{out}' is not empty and is not an earlier ingest's output; "
            "choose a new folder"
        )
    storage.makedirs(out)


def ingest(src: str, out: str, cfg: IngestConfig) -> IngestSummary:
    """Cut every scan under SRC into patches and write the patch table to OUT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.time()
    if not storage.exists(src) and not storage.is_dir(src):
        raise InputError(f"scan source '{src}' does not exist")
    files = storage.list_files(src)
    if not files:
        raise InputError(f"scan source '{src}' holds no files")
    _prepare_out(out)
    use_ray = _use_ray(cfg, len(files))
    scans = _run_chunks(files, src, out, cfg, use_ray)

    good = [s for s in scans if s["reason"] is None]
    bad = [s for s in scans if s["reason"] is not None]
    norms = sorted({s["normalisation"] for s in good})
    summary = IngestSummary(
        files=len(files),
        scans=len(good),
        patches=sum(s["n_patches"] for s in good),
        skipped_patches=sum(s["n_skipped"] for s in good),
        quarantined=len(bad),
        normalisation=[json.loads(n) for n in norms],
        engine="ray" if use_ray else "local",
        params={"src": src, **asdict(cfg)},
    )
    for name, rows in (("_scans.parquet", good), ("_quarantine.parquet", bad)):
        if rows:
            fs, inner = storage.filesystem_for(storage.join(out, name))
            with fs.open_output_stream(inner) as f:
                pq.write_table(pa.Table.from_pylist(rows, schema=_scan_schema()), f)
    if summary.patches == 0:
        if bad:
            why = f"{len(bad)} file(s) could not be used; first: '{bad[0]['path']}': "
            why += bad[0]["reason"]
        else:
            why = f"all {summary.skipped_patches} patches fell below --min-foreground"
        raise InputError(f"ingest of '{src}' produced no patches: {why}")
    summary.seconds = round(time.time() - started, 3)
    storage.write_json(storage.join(out, "_ingest.json"), asdict(summary))
    return summary
