"""Parquet datasets on local disk or S3: open, check, count, read a few columns.

Everything here streams or reads footers; nothing loads a whole archive unless asked for
specific small columns (eval reads `label` and `anomaly_score`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anogan_batch import storage
from anogan_batch.errors import InputError
from anogan_batch.patches import check_columns

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads


def parquet_files(path: str) -> list[str]:
    """The Parquet files of a dataset (a file, or a folder tree), skipping _/. entries."""
    if not storage.exists(path) and not storage.is_dir(path):
        raise InputError(f"'{path}' does not exist")
    files = storage.list_files(path, suffixes=(".parquet", ".parq", ".pq"))
    if not files:
        raise InputError(f"'{path}' holds no Parquet files (*.parquet)")
    return files


def open_dataset(path: str) -> pads.Dataset:
    """A pyarrow dataset over `path` (hive partitions discovered), or InputError."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    files = parquet_files(path)
    fs, _ = storage.filesystem_for(path)
    inner = [storage.filesystem_for(f)[1] for f in files]
    base = storage.filesystem_for(path)[1]
    try:
        return pads.dataset(
            inner,
            filesystem=fs,
            format="parquet",
            partitioning=pads.HivePartitioning.discover(infer_dictionary=False),
            partition_base_dir=base,
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read Parquet dataset '{path}': {e}") from e


def open_patch_table(path: str) -> pads.Dataset:
    """Open a patch table and check its required columns; empty tables are an error."""
    ds = open_dataset(path)
    check_columns(ds.schema, path)
    return ds


def count_rows(ds: pads.Dataset, where: str) -> int:
    """Row count from Parquet footers; a corrupt file is named in the error."""
    import pyarrow as pa

    total = 0
    for fragment in ds.get_fragments():
        try:
            total += fragment.count_rows()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"'{where}': cannot read '{fragment.path}': {e}") from e
    return total


def first_rows(ds: pads.Dataset, columns: list[str], n: int = 1) -> pa.Table:
    """The first `n` rows of the first non-empty file: a cheap sample for up-front checks."""
    cols = [c for c in columns if c in ds.schema.names]
    return ds.head(n, columns=cols)


def read_columns(path: str, columns: list[str], filter_expr=None) -> pa.Table:
    """Read some columns of a dataset (optionally filtered); missing optional columns skip."""
    ds = open_dataset(path)
    cols = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=cols, filter=filter_expr)


def write_patch_table(
    path: str,
    pixels,
    labels: list[str | None] | None = None,
    *,
    ids: list[str] | None = None,
    scan_ids: list[str] | None = None,
    files: int = 1,
) -> str:
    """Write pixels (N, H, W[, C]) as a patch table (all at (0, 0) of their scan) in `files`
    Parquet files. For arrays already in memory: tests, benchmarks, notebooks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.patches import PATCH_SCHEMA, encode_pixels, patch_id_for

    if pixels.ndim == 3:
        pixels = pixels[..., None]
    n, h, w, c = pixels.shape
    scan_ids = scan_ids or [f"scan{i:05d}" for i in range(n)]
    ids = ids or [patch_id_for(s, 0, 0, h) for s in scan_ids]
    labels = labels if labels is not None else [None] * n
    storage.makedirs(path)
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        m = len(part)
        table = pa.table(
            {
                "patch_id": [ids[i] for i in part],
                "scan_id": [scan_ids[i] for i in part],
                "x": pa.array(np.zeros(m), pa.int32()),
                "y": pa.array(np.zeros(m), pa.int32()),
                "image": [encode_pixels(pixels[i]) for i in part],
                "height": pa.array([h] * m, pa.int32()),
                "width": pa.array([w] * m, pa.int32()),
                "channels": pa.array([c] * m, pa.int32()),
                "dtype": [pixels.dtype.name] * m,
                "label": [labels[i] for i in part],
            },
            schema=PATCH_SCHEMA,
        )
        fs, inner = storage.filesystem_for(storage.join(path, f"part-{k:05d}.parquet"))
        with fs.open_output_stream(inner) as f:
            pq.write_table(table, f, compression="zstd")
    return path


def table_normalisation(path: str) -> dict | None:
    """The pixel normalisation ingest recorded for a patch table, or None when unrecorded
    (a table not written by `ingest`). A table mixing several is an error: one model can
    only have learned one."""
    record = storage.join(path, "_ingest.json")
    if not storage.exists(record):
        return None
    norms = storage.read_json(record).get("normalisation") or []
    if len(norms) > 1:
        raise InputError(
            f"patch table '{path}' mixes pixel normalisations {norms}; ingest scans of each "
            "depth separately, or pass the same --window to all of them"
        )
    return norms[0] if norms else None


def check_normalisation(table: dict | None, model: dict, patches: str, model_dir: str) -> None:
    """InputError when a table's recorded normalisation differs from the model's."""
    if table is None:
        return
    want = {"dtype": model.get("pixel_dtype"), "window": model.get("window")}
    if table != want:
        raise InputError(
            f"patch table '{patches}' was normalised as {table}, but model '{model_dir}' was "
            f"trained on {want}; re-ingest the scans the way the training scans were "
            "(same bit depth and --window)"
        )
