"""Scan files -> patch table, in parallel on Ray Data over the file list.

Every file under SRC whose extension has a reader (see `readers.READERS`) is read, its values
normalised for storage (`readers.to_stored`), and cut into P x P patches on a grid of stride S.
When the grid does not reach the right or bottom border, one more row/column of patches flush
with the border is added, so every pixel is covered (heatmaps need full coverage). With
`min_foreground`, patches whose share of foreground pixels (readers.foreground_mask) is below
it are skipped, as the paper scores only patches inside the retina.

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
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.patches import PATCH_SCHEMA, encode_pixels, patch_id_for
from anogan_batch.io.readers import READERS, foreground_mask, suffix_of, to_stored
from anogan_batch.io.storage import Listed
from anogan_batch.job.configs import AUTO_RAY_FILES, IngestConfig

# files whose slices get '@0007'
VOLUME_SUFFIXES = (".npy", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
SCAN_FIELDS = (
    "path", "scan_id", "label", "height", "width", "channels", "dtype",
    "n_patches", "n_skipped", "normalisation", "reason",
)  # fmt: skip


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


def scan_id_for(name: str) -> str:
    """A file's scan_id: its path relative to SRC ('/'-separated), without the extension
    (both parts of '.nii.gz')."""
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else name


def label_for(src: str, name: str) -> str:
    """--label-from-parent: the folder holding the file (SRC's own name for files at the top)."""
    return posixpath.basename(posixpath.dirname(name)) or posixpath.basename(src.rstrip("/"))


def plan_files(src: str, cfg: IngestConfig) -> tuple[list[Listed], list[dict]]:
    """The files under SRC to ingest, and a scan row with the reason for each one that is not:
    what `storage.walk` could not open, files over `max_file_bytes`, and files whose scan_id
    another file already has ('a.png' and 'a.npy'; 'ct@0003.png' beside volume 'ct.npy'):
    two files must never write the same patch_ids. The first by name keeps the id."""
    files, refused = [], []
    for f in storage.walk(src):
        if f.problem is not None:
            refused.append(_scan_row(f.shown, reason=f.problem))
        elif f.size > cfg.max_file_bytes:
            why = f"file is {f.size:,} bytes, over the {cfg.max_file_bytes:,} a scan may have"
            refused.append(_scan_row(f.shown, reason=why + " (see --max-pixels)"))
        else:
            files.append(f)
    owner: dict[str, Listed] = {}
    volumes = set()
    for f in files:
        if _suffix(f.name) in READERS:
            owner.setdefault(scan_id_for(f.name), f)
            if _suffix(f.name) in VOLUME_SUFFIXES:
                volumes.add(scan_id_for(f.name))
    kept = []
    for f in files:
        scan_id = scan_id_for(f.name)
        first = owner.get(scan_id)
        slice_of = SLICE_ID.fullmatch(scan_id)
        if first is not None and first is not f:
            why = f"scan_id {scan_id!r} is already the id of '{first.name}'; rename one of them"
            refused.append(_scan_row(f.shown, scan_id=scan_id, reason=why))
        elif first is f and slice_of and slice_of.group(1) in volumes:
            volume = owner[slice_of.group(1)].name
            why = f"scan_id {scan_id!r} may be a slice id of volume '{volume}'; rename it"
            refused.append(_scan_row(f.shown, scan_id=scan_id, reason=why))
        else:
            kept.append(f)
    return kept, refused


SLICE_ID = re.compile(r"(.*)@\d{4,}")


def _suffix(name: str) -> str:
    return suffix_of(name)


def _scan_row(path: str, **values) -> dict:
    row = dict.fromkeys(SCAN_FIELDS)
    row.update({"path": path, "n_patches": 0, "n_skipped": 0, **values})
    return row


def read_file(f: Listed, limit: int) -> bytes:
    """A scan file's bytes, never more than `limit` (a file may have grown since listing)."""
    if storage.is_s3(f.path):
        raw = storage.read_bytes(f.path)
    else:
        with open(f.path, "rb") as fh:
            raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"file is over the {limit:,} bytes a scan may have (see --max-pixels)")
    return raw


def process_file(f: Listed, src: str, cfg: IngestConfig) -> tuple[list[dict], list[dict]]:
    """One scan file -> (patch rows, one scan row per image or a row with the reason)."""
    path = f.shown
    ext = _suffix(f.name)
    reader = READERS.get(ext)
    if reader is None:
        return [], [_scan_row(path, reason=f"unsupported format '{ext or '(none)'}'")]
    try:
        raw = read_file(f, cfg.max_file_bytes)
        if not raw:
            raise ValueError("file is empty (0 bytes)")
        images = reader(raw, cfg.read_options)
    except Exception as e:  # any decoder error means this one file is unreadable
        return [], [_scan_row(path, reason=f"unreadable {ext} file: {_one_line(e)}")]
    base_id = scan_id_for(f.name)
    label = label_for(src, f.name) if cfg.label_from_parent else None
    rows: list[dict] = []
    scans: list[dict] = []
    for img in images:
        where, scan_id = path + img.suffix, base_id + img.suffix
        try:
            pixels, norm = to_stored(img, cfg.read_options)
            image_rows, skipped = cut_scan(pixels, scan_id, label, cfg)
        except Exception as e:  # this image's values cannot be stored or cut
            scans.append(_scan_row(where, scan_id=scan_id, reason=_one_line(e)))
            continue
        h, w, c = pixels.shape
        rows.extend(image_rows)
        scans.append(
            _scan_row(
                where,
                scan_id=scan_id,
                label=label,
                height=h,
                width=w,
                channels=c,
                dtype=pixels.dtype.name,
                n_patches=len(image_rows),
                n_skipped=skipped,
                normalisation=json.dumps(norm, sort_keys=True),
            )
        )
    return rows, scans


def cut_scan(
    pixels: np.ndarray, scan_id: str, label: str | None, cfg: IngestConfig
) -> tuple[list[dict], int]:
    """One stored image (H, W, C) -> (its patch rows, patches skipped below --min-foreground).
    ValueError when it is smaller than a patch."""
    h, w, c = pixels.shape
    size = cfg.patch_size
    if h < size or w < size:
        raise ValueError(f"image is {h}x{w}, smaller than the {size}px patch")
    mask = foreground_mask(pixels) if cfg.min_foreground > 0 else None
    rows, skipped = [], 0
    for x, y, patch in cut_patches(pixels, size, cfg.step):
        if mask is not None and mask[y : y + size, x : x + size].mean() < cfg.min_foreground:
            skipped += 1
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
    return rows, skipped


def _one_line(e: Exception) -> str:
    """An exception as one short line for a reason column (decoders write long ones)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r" at 0x[0-9a-f]+", "", text)[:300]  # no memory addresses: reruns agree


def _write_part(out: str, name: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=PATCH_SCHEMA)
    fs, inner = storage.filesystem_for(storage.join(out, name))
    with fs.open_output_stream(inner) as f:
        pq.write_table(table, f, compression="zstd")


def ingest_chunk(files: list[Listed], src: str, out: str, cfg: IngestConfig) -> list[dict]:
    """Ingest a chunk of files: write its parts, return its scan rows. Idempotent."""
    key = hashlib.sha1(files[0].name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    pending: list[dict] = []
    scans: list[dict] = []
    parts = 0
    for f in files:
        rows, file_scans = process_file(f, src, cfg)
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

    files = [
        Listed(os.fsdecode(bytes(p)), str(n), int(z))
        for p, n, z in zip(batch["path"], batch["name"], batch["size"], strict=True)
    ]
    scans = ingest_chunk(files, src, out, cfg)
    return pa.Table.from_pylist(scans, schema=_scan_schema())


def _scan_schema():
    import pyarrow as pa

    ints = ("height", "width", "channels", "n_patches", "n_skipped")
    return pa.schema([(f, pa.int64() if f in ints else pa.string()) for f in SCAN_FIELDS])


def _use_ray(cfg: IngestConfig, n_files: int) -> bool:
    if cfg.engine != "auto":
        return cfg.engine == "ray"
    return n_files > AUTO_RAY_FILES or bool(os.environ.get("RAY_ADDRESS"))


def _run_chunks(files: list[Listed], src: str, out: str, cfg: IngestConfig, use_ray: bool) -> list:
    if not use_ray:
        return ingest_chunk(files, src, out, cfg)
    import pyarrow as pa
    import ray
    import ray.data

    from anogan_batch.job.raykit import connect_ray, job_data_context

    connect_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    # several chunks per CPU so a slow file does not leave the rest idle
    n_chunks = max(1, min(len(files), 4 * cpus))
    # paths travel as bytes: a local file name need not be UTF-8, and Arrow strings must be
    items = [{"path": os.fsencode(f.path), "name": f.name, "size": f.size} for f in files]
    with job_data_context():
        ds = ray.data.from_items(items, override_num_blocks=n_chunks)
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
    files, refused = plan_files(src, cfg)
    if not files and not refused:
        raise InputError(f"scan source '{src}' holds no files")
    _prepare_out(out)
    use_ray = _use_ray(cfg, len(files))
    scans = refused + (_run_chunks(files, src, out, cfg, use_ray) if files else [])

    good = [s for s in scans if s["reason"] is None]
    bad = [s for s in scans if s["reason"] is not None]
    norms = sorted({s["normalisation"] for s in good})
    summary = IngestSummary(
        files=len(files) + len(refused),
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
