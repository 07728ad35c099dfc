"""Measure the patch_id uniqueness check on a large patch table (figures: docs/performance.md).

    python scripts/measure_id_check.py [--rows 1000000] [--files 8] [--dir /tmp/idcheck]

Writes a table of `rows` 28x28 MNIST patches with ingest-style ids (once; reused when present),
then times `check_patch_ids` in the driver (pyarrow group-by) and on a local Ray (Ray Data
group-by, as above 2 M rows), and prints JSON with seconds and peak memory of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def make_table(path: str, rows: int, files: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.evaluation.demo import load_sample
    from anogan_batch.io.patches import PATCH_SCHEMA, patch_id_for

    digits = load_sample()["train_images"]
    os.makedirs(path, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        lo, hi = f * per_file, min(rows, (f + 1) * per_file)
        idx = np.arange(lo, hi)
        scans = [f"site{i % 7}/scan{i // 64:07d}" for i in idx]
        xs, ys = (idx % 8) * 28, ((idx // 8) % 8) * 28
        ids = [patch_id_for(s, x, y, 28) for s, x, y in zip(scans, xs, ys, strict=True)]
        table = pa.table(
            {
                "patch_id": ids,
                "scan_id": scans,
                "x": pa.array(xs, pa.int32()),
                "y": pa.array(ys, pa.int32()),
                "image": [digits[i % len(digits)].tobytes() for i in idx],
                "label": pa.nulls(len(idx), pa.string()),
            }
        )
        names = [n for n in PATCH_SCHEMA.names if n in table.column_names]
        pq.write_table(table.select(names), os.path.join(path, f"part-{f:03d}.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/idcheck")
    args = ap.parse_args()
    path = os.path.join(args.dir, f"patches-{args.rows}")
    if not os.path.isdir(path):
        make_table(path, args.rows, args.files)

    from anogan_batch.io.tables import check_patch_ids
    from anogan_batch.job.raykit import connect_ray, job_data_context

    result = {"rows": args.rows, "files": args.files}
    t0 = time.time()
    check_patch_ids(path, args.rows, driver_rows=args.rows)
    result["driver_s"] = round(time.time() - t0, 2)
    result["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    connect_ray()
    with job_data_context():
        t0 = time.time()
        check_patch_ids(path, args.rows, driver_rows=0)
        result["ray_s"] = round(time.time() - t0, 2)
        t0 = time.time()
        check_patch_ids(path, args.rows, driver_rows=0)  # warm: Ray's workers already started
        result["ray_warm_s"] = round(time.time() - t0, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
