"""Scan files -> patch table, in parallel on Ray Data, in two phases.

Phase one, over the file list in chunks: every file whose extension has a reader
(`readers.READERS`) is read whole, its values normalised for storage (`readers.to_stored`),
and cut into P x P patches on a grid of stride S (one more row/column flush with the border
covers every pixel: heatmaps need full coverage). A volume (a 3-D NPY or NIfTI, a TIFF stack,
a multi-frame DICOM) is one scan whose rows carry `slice`. A slide (a single-image TIFF,
ingest/) is read by region instead: its plan (resolution, low-resolution mask, grid) is made
here, and a small one is cut at once. With `min_foreground` (or `--mask`), patches whose share
of foreground is below it are skipped, as the paper scores only patches inside the retina.

Phase two, one Ray Data task an item: a large slide's work units (ingest/plan.py) and the DICOM
series, grouped and ordered from their headers beforehand (ingest/series.py). Each item writes
its own Parquet file and then a record under `_units/`, so a rerun of an ingest that died
resumes there (`_ingest_plan.json` says which ingest it was).

Every part is named after its chunk, unit or volume, so a retried task overwrites rather than
duplicates. The driver writes one small row per scan (a row a slice for volumes) as
OUT/_scans.parquet and per unreadable file, slice or region as OUT/_quarantine.parquet (path
and reason); OUT/_ingest.json holds the counts and the table's pixel normalisation, checked
again at train and score time. Ingest fails (exit 2) only when nothing at all could be read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from anogan_batch.errors import InputError
from anogan_batch.ingest import regions
from anogan_batch.ingest.masks import foreground_mask
from anogan_batch.ingest.plan import cut_patches
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    CHANNELS,
    DOWNSAMPLE,
    DTYPE,
    HEIGHT,
    IMAGE,
    LABEL,
    LEVEL,
    MPP,
    N_PATCHES,
    N_SKIPPED,
    NORMALISATION,
    PATCH_ID,
    PATH,
    REASON,
    SCAN_ID,
    SCANS_COLUMNS,
    SLICE,
    SOURCE,
    WIDTH,
    X,
    Y,
    scans_schema,
)
from anogan_batch.io.patches import (
    INGEST_RECORD,
    INGEST_SCHEMA,
    QUARANTINE_FILE,
    SCANS_FILE,
    encode_pixels,
    patch_id_for,
)
from anogan_batch.io.readers import READERS, slice_suffix, suffix_of, to_stored
from anogan_batch.io.s3 import describe_s3_failure
from anogan_batch.io.storage import Listed
from anogan_batch.job.ingest_config import AUTO_RAY_FILES, AUTO_RAY_UNITS, IngestConfig

# files whose slices get '@0007'
VOLUME_SUFFIXES = (".npy", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
UNITS = "_units"  # a region scan's deferred work units (JSON), between the two phases
FLUSH_BYTES = 64 * 2**20  # a unit's rows written out at about this many bytes


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
        elif f.size > cfg.max_file_bytes and _suffix(f.name) not in regions.REGION_SUFFIXES:
            why = f"file is {f.size:,} bytes, over the {cfg.max_file_bytes:,} a scan may have"
            refused.append(_scan_row(f.shown, reason=why + " (see --max-pixels)"))
        else:
            files.append(f)
    owner: dict[str, Listed] = {}
    volumes = set()
    for f in files:
        if _suffix(f.name) in READERS or _suffix(f.name) in regions.REGION_SUFFIXES:
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
    row = dict.fromkeys(SCANS_COLUMNS)
    row.update({PATH: path, N_PATCHES: 0, N_SKIPPED: 0, **values})
    return row


def _region_params(cfg: IngestConfig) -> regions.RegionParams:
    return regions.RegionParams(
        patch=cfg.patch_size,
        step=cfg.step,
        min_foreground=cfg.foreground_share,
        mpp=cfg.mpp,
        level=cfg.level,
        options=cfg.read_options,
    )


def read_file(f: Listed, limit: int) -> bytes:
    """A scan file's bytes, never more than `limit` (a file may have grown since listing)."""
    if storage.is_s3(f.path):
        raw = storage.read_bytes(f.path, limit)
    else:
        with open(f.path, "rb") as fh:
            raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"file is over the {limit:,} bytes a scan may have (see --max-pixels)")
    return raw


def raise_storage_faults(e: BaseException) -> None:
    """Re-raise `e` when it is S3 failing past its retry policy: the storage's fault, not the
    file's, so never a quarantine reason (exit 1; a rerun resumes). Called first in every
    handler that quarantines a file or a slice for what reading it raised."""
    if describe_s3_failure(e) is not None:
        raise e


def process_file(f: Listed, src: str, cfg: IngestConfig) -> tuple[list[dict], list[dict]]:
    """One scan file -> (patch rows, one scan row per image or a row with the reason). A
    scan read by region with more than one work unit returns its scan row with the units
    (UNITS) and no rows: `run_units` cuts them."""
    path = f.shown
    ext = _suffix(f.name)
    if ext in regions.REGION_SUFFIXES and f.size > 0:  # an empty file: the reason below
        try:
            done = process_region_file(f, src, cfg)
        except Exception as e:  # the header or the plan: this one file is unreadable
            raise_storage_faults(e)
            return [], [_scan_row(path, reason=f"unreadable {ext} file: {_one_line(e)}")]
        if done is not None:
            return done
    reader = READERS.get(ext)
    if reader is None:
        return [], [_scan_row(path, reason=f"unsupported format '{ext or '(none)'}'")]
    try:
        raw = read_file(f, cfg.max_file_bytes)
        if not raw:
            raise ValueError("file is empty (0 bytes)")
        images = reader(raw, cfg.read_options)
    except Exception as e:  # any decoder error means this one file is unreadable
        raise_storage_faults(e)
        return [], [_scan_row(path, reason=f"unreadable {ext} file: {_one_line(e)}")]
    base_id = scan_id_for(f.name)
    label = label_for(src, f.name) if cfg.label_from_parent else None
    rows: list[dict] = []
    scans: list[dict] = []
    volume = len(images) > 1  # the file is one scan, its images the volume's slices
    about = {"format": ext.lstrip("."), "backend": reader.__name__, **getattr(images, "info", {})}
    for k, img in _slices_read(images):
        slice_ = k if volume else None
        if isinstance(img, Exception):  # a slab that could not be read: the rest neither
            where = path + (slice_suffix(k) if volume else "")
            reason = f"unreadable {ext} data: {_one_line(img)}"
            scans.append(_scan_row(where, scan_id=base_id, slice=slice_, reason=reason))
            break
        where, scan_id = path + img.suffix, base_id
        try:
            pixels, norm = to_stored(img, cfg.read_options)
            image_rows, skipped = cut_scan(pixels, scan_id, label, cfg, slice_)
        except Exception as e:  # this image's values cannot be stored or cut
            scans.append(_scan_row(where, scan_id=scan_id, slice=slice_, reason=_one_line(e)))
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
                level=0,
                downsample=1.0,
                source=json.dumps(about),
                slice=slice_,
            )
        )
    return rows, scans


def _slices_read(images):
    """(k, image) of a reader's images as they are read (a NIfTI reads a slab at a time), or
    (k, the exception) for the first that cannot be read, which ends them."""
    iterator = iter(images)
    for k in range(len(images)):
        try:
            yield k, next(iterator)
        except Exception as e:  # the file's data ends or is corrupt from slice k on
            yield k, e
            return


def process_region_file(f: Listed, src: str, cfg: IngestConfig):
    """A file read by region (ingest/regions.py): its plan, and its rows when the plan is one
    work unit; None when the file is not a single-image TIFF (io/readers reads it)."""
    fh = storage.open_input(f.path)
    try:
        source = regions.open_source(fh, cfg.max_pixels)
        if source is None:
            return None
        params = _region_params(cfg)
        scan_id, label = scan_id_for(f.name), (label_for(src, f.name) if cfg.label_from_parent
                                               else None)  # fmt: skip
        plan = regions.plan_scan(source, params, user_mask(cfg, scan_id))
        res, level0 = plan.resolution, source.levels[0]
        scan = _scan_row(
            f.shown,
            scan_id=scan_id,
            label=label,
            height=level0.height,
            width=level0.width,
            channels=source.channels,
            dtype=plan.stored_dtype,
            n_patches=plan.grid.kept,
            n_skipped=plan.grid.skipped,
            normalisation=json.dumps(plan.normalisation, sort_keys=True),
            level=res.level,
            downsample=res.downsample,
            mpp=res.mpp,
            source=json.dumps(plan.source),
            warning=res.warning,
        )
        if len(plan.units) > 1 or _unit_bytes(plan, cfg.patch_size, source.channels) > FLUSH_BYTES:
            # the units' rows are counted when they have run (settle_units)
            scan[UNITS] = json.dumps([regions.rows_to_json(u) for u in plan.units])
            scan[N_PATCHES] = 0
            return [], [scan]
        rows, failed = [], []
        for item in regions.cut_unit(source, res, plan.units[0] if plan.units else [], params,
                                     scan_id, label):  # fmt: skip
            (failed if isinstance(item, regions.Failed) else rows).append(item)
        scan[N_PATCHES] = len(rows)
        if failed and not rows:  # nothing of it could be read: the scan's own reason
            scan[REASON] = f"no region could be read: {failed[0].reason}"
            scan[N_PATCHES], failed = 0, []
        return rows, [scan] + [_failed_row(f.shown, scan_id, x) for x in failed]
    finally:
        fh.close()


def _unit_bytes(plan: regions.RegionPlan, patch: int, channels: int) -> int:
    """The pixel bytes of the largest unit's rows: only a scan whose rows are small is cut in
    the first phase, which holds them until its part is written."""
    per_patch = patch * patch * channels * np.dtype(plan.stored_dtype).itemsize
    return max((sum(len(r.xs) for r in u) for u in plan.units), default=0) * per_patch


def _failed_row(path: str, scan_id: str, failed: regions.Failed) -> dict:
    """The quarantine row of one patch of a region scan that could not be read."""
    return _scan_row(f"{path}@x={failed.x},y={failed.y}", scan_id=scan_id, reason=failed.reason)


def cut_scan(
    pixels: np.ndarray,
    scan_id: str,
    label: str | None,
    cfg: IngestConfig,
    slice_: int | None = None,
) -> tuple[list[dict], int]:
    """One stored image (H, W, C), or slice `slice_` of a volume -> (its patch rows, patches
    skipped below --min-foreground). ValueError when it is smaller than a patch."""
    h, w, c = pixels.shape
    size = cfg.patch_size
    if h < size or w < size:
        raise ValueError(f"image is {h}x{w}, smaller than the {size}px patch")
    mask = user_mask(cfg, scan_id if slice_ is None else f"{scan_id}{slice_suffix(slice_)}")
    if mask is not None:
        mask = regions.resize_mask(mask, h, w)
    elif cfg.min_foreground > 0:
        mask = foreground_mask(pixels)
    share = cfg.foreground_share
    rows, skipped = [], 0
    for x, y, patch in cut_patches(pixels, size, cfg.step):
        if mask is not None and mask[y : y + size, x : x + size].mean() < share:
            skipped += 1
            continue
        rows.append(
            {
                PATCH_ID: patch_id_for(scan_id, x, y, size, slice_),
                SCAN_ID: scan_id,
                X: x,
                Y: y,
                SLICE: slice_,
                IMAGE: encode_pixels(patch),
                HEIGHT: size,
                WIDTH: size,
                CHANNELS: c,
                DTYPE: patch.dtype.name,
                LABEL: label,
                LEVEL: 0,
                MPP: None,
            }
        )
    return rows, skipped


MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def user_mask(cfg: IngestConfig, scan_id: str) -> np.ndarray | None:
    """The user's mask of `scan_id` (--mask FOLDER: FOLDER/<scan_id>.png, .tif or .npy, any
    size, nonzero = foreground), read within --max-pixels; None with --mask auto. A scan
    without its mask is an error of that scan (it is quarantined, not cut unmasked)."""
    if cfg.mask == "auto":
        return None
    parts = scan_id.split("/")
    if not scan_id or "\0" in scan_id or any(p in ("", ".", "..") for p in parts):
        # a scan_id comes from data (a DICOM series' UID): it names a file inside FOLDER only
        raise ValueError(f"scan_id {scan_id!r} cannot name a mask file inside '{cfg.mask}'")
    for suffix in MASK_SUFFIXES:
        path = storage.join(cfg.mask, scan_id + suffix)
        if storage.exists(path):
            raw = storage.read_bytes(path, cfg.max_file_bytes)
            if len(raw) > cfg.max_file_bytes:
                raise ValueError(f"mask '{path}' is over the {cfg.max_file_bytes:,} bytes a "
                                 "scan may have (see --max-pixels)")  # fmt: skip
            (image,) = READERS[suffix](raw, cfg.read_options)[:1]
            return image.values
    raise ValueError(f"no mask for scan_id {scan_id!r} in '{cfg.mask}' (looked for "
                     f"{', '.join(scan_id + s for s in MASK_SUFFIXES)})")  # fmt: skip


def _one_line(e: Exception) -> str:
    """An exception as one short line for a reason column (decoders write long ones)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r" at 0x[0-9a-f]+", "", text)[:300]  # no memory addresses: reruns agree


def _rows_table(rows: list[dict]):
    """Patch rows (dicts) as an INGEST_SCHEMA table, column by column: 4x faster than row by
    row for large patches (docs/performance.md)."""
    import pyarrow as pa

    names = INGEST_SCHEMA.names
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names}, schema=INGEST_SCHEMA)


def _write_part(out: str, name: str, rows: list[dict]) -> None:
    import pyarrow.parquet as pq

    table = _rows_table(rows)
    fs, inner = storage.filesystem_for(storage.join(out, name))
    with fs.open_output_stream(inner) as f:
        pq.write_table(table, f, compression="zstd")


def ingest_chunk(files: list[Listed], src: str, out: str, cfg: IngestConfig) -> list[dict]:
    """Ingest a chunk of files: write its parts, return its scan rows. Idempotent."""
    key = hashlib.sha1(files[0].name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    pending: list[dict] = []
    scans: list[dict] = []
    parts, size = 0, 0
    for f in files:
        rows, file_scans = process_file(f, src, cfg)
        pending.extend(rows)
        size += sum(len(r[IMAGE]) for r in rows)
        scans.extend(file_scans)
        # a part at rows_per_file rows, or sooner at FLUSH_BYTES of pixels (large patches)
        while len(pending) >= cfg.rows_per_file or (pending and size >= FLUSH_BYTES):
            take = cfg.rows_per_file if len(pending) >= cfg.rows_per_file else len(pending)
            _write_part(out, f"part-{key}-{parts:04d}.parquet", pending[:take])
            pending, parts = pending[take:], parts + 1
            size = sum(len(r[IMAGE]) for r in pending)
    if pending:
        _write_part(out, f"part-{key}-{parts:04d}.parquet", pending)
    return scans


def _ray_ingest_batch(batch: dict, src: str, out: str, cfg: IngestConfig):
    import pyarrow as pa

    files = [
        Listed(os.fsdecode(bytes(p)), str(n), int(z))
        for p, n, z in zip(batch[PATH], batch["name"], batch["size"], strict=True)
    ]
    scans = ingest_chunk(files, src, out, cfg)
    return pa.Table.from_pylist(scans, schema=_scan_schema())


def _scan_schema(units: bool = True):
    return scans_schema(*((UNITS,) if units else ()))


# ---- the second phase: a region scan's work units, one task each ---------------------------


def unit_items(scans: list[dict], files: dict[str, Listed]) -> list[dict]:
    """The work units the first phase deferred, one item each (small: rows as JSON)."""
    items = []
    for scan in scans:
        if not scan.get(UNITS):
            continue
        f = files[scan[PATH]]
        for index, rows in enumerate(json.loads(scan[UNITS])):
            items.append({
                PATH: os.fsencode(f.path), "name": f.name, "shown": f.shown,
                SCAN_ID: scan[SCAN_ID], LABEL: scan[LABEL], LEVEL: scan[LEVEL],
                DOWNSAMPLE: scan[DOWNSAMPLE], MPP: scan[MPP], "index": index,
                "rows": rows,
            })  # fmt: skip
    return items


def run_unit(item: dict, out: str, cfg: IngestConfig) -> dict:
    """Cut one work unit into its own part file (a retried unit rewrites it); -> the scan's
    id, the rows written and the patches that could not be read."""
    import pyarrow.parquet as pq

    from anogan_batch.ingest.levels import Resolution

    path = os.fsdecode(bytes(item[PATH]))
    source = regions.cached_source(path, cfg.max_pixels)
    lv = source.levels[int(item[LEVEL])]
    ds = float(item[DOWNSAMPLE])
    res = Resolution(int(item[LEVEL]), ds / lv.downsample, ds, item[MPP], None)
    rows = regions.rows_from_json(item["rows"])
    key = hashlib.sha1(str(item["name"]).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    target = storage.join(out, f"part-{key}-u{int(item['index']):05d}.parquet")
    fs, inner = storage.filesystem_for(target)
    written, failed, pending, size = 0, [], [], 0
    with (
        fs.open_output_stream(inner) as f,
        pq.ParquetWriter(f, INGEST_SCHEMA, compression="zstd") as writer,
    ):
        for row in regions.cut_unit(source, res, rows, _region_params(cfg), item[SCAN_ID],
                                    item[LABEL]):  # fmt: skip
            if isinstance(row, regions.Failed):
                failed.append(_failed_row(item["shown"], item[SCAN_ID], row))
                continue
            pending.append(row)
            size += len(row[IMAGE])
            if size >= FLUSH_BYTES:  # a unit's rows never all in memory
                writer.write_table(_rows_table(pending))
                written, pending, size = written + len(pending), [], 0
        writer.write_table(_rows_table(pending))
        written += len(pending)
    return {SCAN_ID: item[SCAN_ID], "written": written, "failed": json.dumps(failed)}


DICOM_SUFFIXES = (".dcm", ".dicom")
HEADER_THREADS = 16  # DICOM headers read at once (I/O: S3 round trips)


def plan_series(files: list[Listed], src: str, cfg: IngestConfig) -> tuple[list[dict], list]:
    """DICOM files of two or more slices a series -> (one item a volume, ordered by
    ingest/series.py; the files that stay scans of their own: no series, one slice, several
    frames, or a header that cannot be read, which the first phase then reports)."""
    from concurrent.futures import ThreadPoolExecutor

    from anogan_batch.ingest import series

    def header(f: Listed):
        try:
            with storage.open_input(f.path) as fh:
                return series.read_header(fh, f.name)
        except Exception:  # the first phase reads it again and names the reason
            return None

    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = list(pool.map(header, files))
    by_name = {f.name: f for f in files}
    grouped = [h for h in headers if h is not None and h.series and h.frames == 1]
    volumes = [v for v in series.group(grouped) if len(v.names) > 1]
    in_volumes = {name for v in volumes for name in v.names}
    items, seen = [], {}
    for v in sorted(volumes, key=lambda v: (-len(v.names), v.names[0])):
        first = by_name[v.names[0]]
        base = f"{posixpath.dirname(first.name) or '.'}/{v.series}"
        seen[base] = seen.get(base, 0) + 1
        scan_id = base if seen[base] == 1 else f"{base}-{seen[base]}"
        about = {"format": "dicom", "series": v.series, "ordered_by": v.ordered_by,
                 "spacing": v.spacing, "problems": v.problems, "slices": len(v.names)}  # fmt: skip
        members = [[os.fsencode(by_name[n].path).hex(), n, by_name[n].shown] for n in v.names]
        items.append({
            "kind": "volume", "index": len(items), SCAN_ID: scan_id, "name": first.name,
            LABEL: label_for(src, first.name) if cfg.label_from_parent else None,
            "members": json.dumps(members), SOURCE: json.dumps(about),
        })  # fmt: skip
    return items, [f for f in files if f.name not in in_volumes]


def run_volume(item: dict, out: str, cfg: IngestConfig) -> dict:
    """One DICOM volume, one scan: its slices in order (`slice` 0, 1, ...) into its own part
    file."""
    import pyarrow.parquet as pq

    from anogan_batch.io.readers import read_dicom

    key = hashlib.sha1(str(item["name"]).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    target = storage.join(out, f"part-{key}-v{int(item['index']):05d}.parquet")
    fs, inner = storage.filesystem_for(target)
    scans, pending = [], []
    with (
        fs.open_output_stream(inner) as f,
        pq.ParquetWriter(f, INGEST_SCHEMA, compression="zstd") as writer,
    ):
        scan_id = item[SCAN_ID]
        for k, (hex_path, name, shown) in enumerate(json.loads(item["members"])):
            listed = Listed(os.fsdecode(bytes.fromhex(hex_path)), name)
            try:
                (image,) = read_dicom(read_file(listed, cfg.max_file_bytes), cfg.read_options)
                pixels, norm = to_stored(image, cfg.read_options)
                rows, skipped = cut_scan(pixels, scan_id, item[LABEL], cfg, k)
            except Exception as e:  # this slice is unreadable; the volume's others are not
                raise_storage_faults(e)
                scans.append(_scan_row(shown, scan_id=scan_id, slice=k, reason=_one_line(e)))
                continue
            h, w, c = pixels.shape
            scans.append(_scan_row(
                shown, scan_id=scan_id, label=item[LABEL], height=h, width=w, channels=c,
                dtype=pixels.dtype.name, n_patches=len(rows), n_skipped=skipped,
                normalisation=json.dumps(norm, sort_keys=True), level=0, downsample=1.0,
                source=item[SOURCE], slice=k,
            ))  # fmt: skip
            pending.extend(rows)
            if sum(len(r[IMAGE]) for r in pending) >= FLUSH_BYTES:
                writer.write_table(_rows_table(pending))
                pending = []
        writer.write_table(_rows_table(pending))
    # each slice's row counts its own patches: nothing for settle_units to add up
    return {SCAN_ID: item[SCAN_ID], "written": 0, "failed": "[]", "scans": json.dumps(scans)}


def run_item(item: dict, out: str, cfg: IngestConfig) -> dict:
    """One second-phase item: a slide's work unit, or a DICOM volume; an item an interrupted
    run of the same ingest finished is not run again (its record says what it did)."""
    record = _done_record(out, item)
    if storage.exists(record):
        return storage.read_json(record)
    if item.get("kind") == "volume":
        done = run_volume(item, out, cfg)
    else:
        done = {**run_unit(item, out, cfg), "scans": "[]"}
    storage.write_json(record, done)  # after its part file is whole
    return done


def _ray_unit_batch(batch, out: str, cfg: IngestConfig):
    import pyarrow as pa

    # pyarrow, not numpy: a null label or pixel size stays None
    done = [run_item(item, out, cfg) for item in batch.to_pylist()]
    return pa.Table.from_pylist(done)


def run_units(items: list[dict], out: str, cfg: IngestConfig, use_ray: bool) -> list[dict]:
    """Every deferred unit, one Ray Data task each (or in this process)."""
    if not use_ray:
        return [run_item(item, out, cfg) for item in items]
    import ray
    import ray.data

    from anogan_batch.job.raykit import connect_ray, job_data_context

    connect_ray()
    with job_data_context():
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_ray_unit_batch, fn_args=(out, cfg), batch_size=1,
                            batch_format="pyarrow", num_cpus=1)  # fmt: skip
        tables = ray.get(ds.to_arrow_refs())
    return [row for t in tables for row in t.to_pylist()]


def settle_units(scans: list[dict], done: list[dict]) -> list[dict]:
    """The scans' rows after their units ran: each region scan counts the rows its units
    wrote; the patches they could not read join the quarantine."""
    written: dict[str, int] = {}
    failed: list[dict] = []
    for d in done:
        written[d[SCAN_ID]] = written.get(d[SCAN_ID], 0) + int(d["written"])
        failed.extend(json.loads(d["failed"]))
        failed.extend(json.loads(d["scans"]))  # a volume's slices: their own scan rows
    for scan in scans:
        if scan.pop(UNITS, None):
            scan[N_PATCHES] = written.get(scan[SCAN_ID], 0)
            if not scan[N_PATCHES]:  # nothing of it could be read: the scan's own reason
                first = next((f[REASON] for f in failed if f[SCAN_ID] == scan[SCAN_ID]),
                             "no patch was cut")  # fmt: skip
                scan[REASON] = f"no region could be read: {first}"
    return scans + failed


def _use_ray(cfg: IngestConfig, n_files: int, n_units: int = 0) -> bool:
    if cfg.engine != "auto":
        return cfg.engine == "ray"
    many = n_files > AUTO_RAY_FILES or n_units >= AUTO_RAY_UNITS
    return many or bool(os.environ.get("RAY_ADDRESS"))


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
    items = [{PATH: os.fsencode(f.path), "name": f.name, "size": f.size} for f in files]
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


PLAN_FILE = "_ingest_plan.json"  # an ingest's parameters, written first: a rerun resumes
DONE_FOLDER = "_units"  # one small record a finished second-phase item (unit or volume)


def _plan_key(src: str, cfg: IngestConfig) -> str:
    text = json.dumps({"src": src, **asdict(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _prepare_out(out: str, plan_key: str) -> bool:
    """OUT must be new, empty, an earlier ingest's output (then replaced) or an interrupted
    one's: of the same command, it is resumed (-> True), its finished work units kept; of
    other parameters, it is replaced."""
    plan = storage.join(out, PLAN_FILE)
    if storage.exists(storage.join(out, INGEST_RECORD)):
        storage.delete(out)
    elif storage.exists(plan):
        if storage.read_json(plan).get("key") == plan_key:
            return True
        storage.delete(out)
    elif storage.is_dir(out) and storage.list_files(out):
        raise InputError(
            f"ingest output '{out}' is not empty and is not an earlier ingest's output; "
            "choose a new folder"
        )
    storage.makedirs(out)
    storage.write_json(plan, {"key": plan_key})
    return False


def _done_record(out: str, item: dict) -> str:
    kind = "v" if item.get("kind") == "volume" else "u"
    key = hashlib.sha1(str(item["name"]).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return storage.join(out, DONE_FOLDER, f"{key}-{kind}{int(item['index']):05d}.json")


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
    _prepare_out(out, _plan_key(src, cfg))
    dicoms = [f for f in files if _suffix(f.name) in DICOM_SUFFIXES]
    volumes, singles = plan_series(dicoms, src, cfg) if len(dicoms) > 1 else ([], dicoms)
    listed = len(files)
    files = [f for f in files if _suffix(f.name) not in DICOM_SUFFIXES] + singles
    use_ray = _use_ray(cfg, listed)
    scans = refused + (_run_chunks(files, src, out, cfg, use_ray) if files else [])
    items = volumes + unit_items(scans, {f.shown: f for f in files})
    if items:
        use_ray = use_ray or _use_ray(cfg, len(files), len(items))
        scans = settle_units(scans, run_units(items, out, cfg, use_ray))

    good = [s for s in scans if s[REASON] is None]
    bad = [s for s in scans if s[REASON] is not None]
    norms = sorted({s[NORMALISATION] for s in good})
    summary = IngestSummary(
        files=listed + len(refused),
        scans=len({s[SCAN_ID] for s in good}),
        patches=sum(s[N_PATCHES] for s in good),
        skipped_patches=sum(s[N_SKIPPED] for s in good),
        quarantined=len(bad),
        normalisation=[json.loads(n) for n in norms],
        engine="ray" if use_ray else "local",
        params={"src": src, **asdict(cfg)},
    )
    for name, rows in ((SCANS_FILE, good), (QUARANTINE_FILE, bad)):
        if rows:
            fs, inner = storage.filesystem_for(storage.join(out, name))
            with fs.open_output_stream(inner) as f:
                table = pa.Table.from_pylist(rows, schema=_scan_schema(units=False))
                pq.write_table(table, f)
    if summary.patches == 0:
        if bad:
            why = f"{len(bad)} file(s) could not be used; first: '{bad[0]['path']}': "
            why += bad[0][REASON]
        else:
            why = f"all {summary.skipped_patches} patches fell below --min-foreground"
        raise InputError(f"ingest of '{src}' produced no patches: {why}")
    summary.seconds = round(time.time() - started, 3)
    storage.write_json(storage.join(out, INGEST_RECORD), asdict(summary))
    return summary
