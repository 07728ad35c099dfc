"""Where a job's outputs live under OUT: the one owner of every name below it.

    OUT/
      job.json                     the manifest (manifest.py)
      metrics.json                 written by `eval`
      report.html                  written by `report` (default place)
      patch_scores/job_id=<id>/    one row per scored patch (Parquet, hive-partitioned)
      quarantine/                  one row per input row that could not be scored
      scan_scores/                 one row per scan
      heatmaps/                    one row per scan, with its full-size heatmap
      overlays/<file_stem(scan_id)>.png
      _checkpoint/                 Ray Data's exactly-once checkpoint while the job runs
      _published_ids/              --skip-published: patch_ids the warehouse holds already
      _decided/                    scan_scores with `flagged`, while `decide` writes it

Names that come from data (a `scan_id`, a `patch_id`) never become paths as they are: a file
named after one gets `file_stem(value)`, a readable ASCII slug plus a hash of the exact value,
and the tables keep the exact value next to the file's path. Whatever the value holds (`..`,
`/`, `\\`, an absolute path, NUL and control characters, 1,000 characters, any Unicode, an
empty string), the file lands directly in its folder under OUT.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from anogan_batch.io import storage
from anogan_batch.io.columns import JOB_ID

PARTITION_COLUMN = JOB_ID  # patch_scores/job_id=<id>/: hive partitioning by job
SLUG_CHARS = 48  # readable part of a file stem; the hash keeps stems unique
HASH_CHARS = 20  # 80 bits of sha256: no collision expected below ~10^11 distinct values
_NOT_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


def file_stem(value: str) -> str:
    """A safe, collision-free file name stem for a value from data.

    'lesion/scan_12' -> 'lesion_scan_12-<20 hex>'. Only [A-Za-z0-9_-] (no dot, so never '..',
    no separator, never hidden), at most SLUG_CHARS + 1 + HASH_CHARS characters; the hash is of
    the exact value's UTF-8 bytes, so values that slug alike ('a/b', 'a_b', 'A:b') stay apart.
    """
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    slug = _NOT_SLUG.sub("_", value).strip("_-")[:SLUG_CHARS].strip("_-")
    return f"{slug}-{digest}" if slug else digest


@dataclass(frozen=True)
class JobLayout:
    """Every path under a job's OUT (local or s3://)."""

    out: str

    PATCH_SCORES = "patch_scores"
    QUARANTINE = "quarantine"
    SCAN_SCORES = "scan_scores"
    HEATMAPS = "heatmaps"
    OVERLAYS = "overlays"
    CHECKPOINT = "_checkpoint"
    PUBLISHED_IDS = "_published_ids"
    DECIDED = "_decided"

    def _join(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    @property
    def manifest(self) -> str:
        return self._join("job.json")

    @property
    def metrics(self) -> str:
        return self._join("metrics.json")

    @property
    def report(self) -> str:
        return self._join("report.html")

    @property
    def patch_scores(self) -> str:
        return self._join(self.PATCH_SCORES)

    @property
    def quarantine(self) -> str:
        return self._join(self.QUARANTINE)

    @property
    def scan_scores(self) -> str:
        return self._join(self.SCAN_SCORES)

    @property
    def heatmaps(self) -> str:
        return self._join(self.HEATMAPS)

    @property
    def overlays(self) -> str:
        return self._join(self.OVERLAYS)

    @property
    def checkpoint(self) -> str:
        return self._join(self.CHECKPOINT)

    @property
    def published_ids(self) -> str:
        """--skip-published: the ids the warehouse already holds for this model and search."""
        return self._join(self.PUBLISHED_IDS)

    @property
    def decided(self) -> str:
        """scan_scores with the scans' `flagged`, staged here before it replaces scan_scores."""
        return self._join(self.DECIDED)

    def overlay(self, scan_id: str) -> str:
        """The PNG overlay of one scan (its name from `file_stem`, never the scan_id itself)."""
        return self._join(self.OVERLAYS, file_stem(scan_id) + ".png")
