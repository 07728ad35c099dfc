"""The job manifest OUT/job.json and the rules for rerunning a job into the same OUT.

A job's identity is what decides its scores: model, input table and search parameters. Rerunning
`score` with the same identity into the same OUT resumes (or, if it succeeded, reports it done);
a different identity is refused rather than mixing two jobs' rows in one table.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from anogan_batch.core.search_config import SCORE_FIELDS, public_name
from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import MODEL_ID
from anogan_batch.job.layout import JobLayout

# Parameters that change a patch's scores. Batch size, actor count and devices do not.
# The search's parameters in job.json's params: with the model, what decides a patch's score
# (the key under which --skip-published takes a published score as this job's own).
SEARCH_KEYS = tuple(public_name(f) for f in SCORE_FIELDS)
IDENTITY_KEYS = (
    MODEL_ID, "patches", *SEARCH_KEYS,
    # p_value and flagged are written with the patch rows: a rerun must use the same ones
    "calibration_id", "fpr",
)  # fmt: skip


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_job_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass
class JobManifest:
    job_id: str
    status: str  # running | succeeded | failed
    model_id: str
    params: dict[str, Any]
    input_rows: int
    scored_rows: int = 0
    quarantined_rows: int = 0
    skipped_rows: int = 0  # --skip-published: rows the warehouse held already, not scored
    started_at: str = field(default_factory=now)
    finished_at: str | None = None
    patches_per_second: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # one entry per (re)run
    calibration: dict[str, Any] | None = None  # which calibration gave p_value, or why none
    decisions: dict[str, Any] | None = None  # --fpr / --fdr and how many were flagged
    drift: dict[str, Any] | None = None  # the job's p-values against Uniform(0, 1)
    error: str | None = None

    @staticmethod
    def path(out: str) -> str:
        return JobLayout(out).manifest

    def save(self, out: str) -> None:
        storage.write_json(self.path(out), asdict(self))

    @classmethod
    def load(cls, out: str) -> JobManifest | None:
        path = cls.path(out)
        if not storage.exists(path):
            return None
        doc = storage.read_json(path)
        try:
            return cls(**{k: doc[k] for k in doc if k in cls.__dataclass_fields__})
        except TypeError as e:
            raise InputError(f"'{path}' is not a job manifest of this version: {e}") from e

    def identity(self) -> dict[str, Any]:
        return {k: self.params.get(k) for k in IDENTITY_KEYS}


def check_rerun(existing: JobManifest, identity: dict[str, Any], job_id: str | None, out: str):
    """Refuse to resume a different job into `out`; name the first differing parameter."""
    if job_id is not None and job_id != existing.job_id:
        raise InputError(
            f"'{out}' holds job {existing.job_id!r}, not --job-id {job_id!r}: use another OUT "
            "or the same job id to resume"
        )
    old = existing.identity()
    for key in IDENTITY_KEYS:
        if old.get(key) != identity.get(key):
            raise InputError(
                f"'{out}' holds job {existing.job_id!r} run with {key}={old.get(key)!r}; this "
                f"run has {key}={identity.get(key)!r}. Scores of the two would mix: use another "
                "OUT, or delete this one to start over"
            )
