"""`anogan-batch submit`: send a job spec from jobs/ to a Ray cluster through the Jobs API.

A job spec is YAML:

    variables: {NAME: default, ...}   # ${NAME} in the entrypoint; --set NAME=value overrides
    entrypoint: anogan-batch score ${MODEL_DIR} ${PATCHES} ${OUT} ...
    runtime_env: {...}                # Ray runtime environment (env_vars, pip, ...)
    entrypoint_num_cpus: 1            # optional, also entrypoint_num_gpus, entrypoint_memory
    metadata: {...}                   # optional

It is a thin wrapper over `ray.job_submission.JobSubmissionClient`; `ray job submit` with the
same entrypoint and `--runtime-env` does the same (see jobs/README.md).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from anogan_batch.errors import ConfigError, InputError
from anogan_batch.io import storage

_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")
SPEC_KEYS = {
    "variables",
    "entrypoint",
    "runtime_env",
    "entrypoint_num_cpus",
    "entrypoint_num_gpus",
    "entrypoint_memory",
    "metadata",
    "description",
}


@dataclass
class JobSpec:
    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # entrypoint_num_cpus, metadata, ...

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.entrypoint)


def load_spec(path: str, overrides: dict[str, str] | None = None) -> JobSpec:
    """Read a job spec and substitute ${VARS}: --set values, then the spec's defaults."""
    import yaml

    try:
        doc = yaml.safe_load(storage.read_bytes(path))
    except yaml.YAMLError as e:
        raise InputError(f"job spec '{path}' is not valid YAML: {e}") from e
    if not isinstance(doc, dict) or "entrypoint" not in doc:
        raise InputError(f"job spec '{path}' needs an 'entrypoint'")
    unknown = sorted(set(doc) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}", doc[unknown[0]], "unknown job spec key")
    values = {k: str(v) for k, v in (doc.get("variables") or {}).items()}
    for key in overrides or {}:
        if key not in values:
            raise ConfigError("--set", key, f"not a variable of {path} ({', '.join(values)})")
    values |= overrides or {}

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ConfigError(f"{path}: ${{{name}}}", None, "variable has no value")
        return values[name]

    entrypoint = _VAR.sub(substitute, " ".join(str(doc["entrypoint"]).split()))
    options = {k: doc[k] for k in doc if k.startswith("entrypoint_") or k == "metadata"}
    return JobSpec(entrypoint, doc.get("runtime_env") or {}, options)


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", item, "use NAME=value")
        out[key] = value
    return out


def default_address() -> str:
    """RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else the local dashboard."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith("http"):
            return value
    return "http://127.0.0.1:8265"


def submit(spec: JobSpec, address: str, *, wait: bool, timeout_s: float, echo=print) -> int:
    """Submit; with `wait`, stream the logs and return the job driver's exit code."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth, version: all user-fixable
        raise InputError(f"cannot reach the Ray Jobs API at {address}: {e}") from e
    job_id = _submit_when_ready(client, spec)
    echo(f"submitted {job_id} to {address}: {spec.entrypoint}")
    if not wait:
        return 0
    deadline = time.time() + timeout_s
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            echo(logs[printed:].rstrip("\n"))
            printed = len(logs)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        if time.time() > deadline:
            raise InputError(f"job {job_id} still {status} after {timeout_s:.0f}s (left running)")
        time.sleep(1.0)
    info = client.get_job_info(job_id)
    echo(f"job {job_id} {status}")
    if status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


AGENT_WAIT_S = 60.0  # a head node that has just started has no job agent for a few seconds


def _submit_when_ready(client, spec: JobSpec) -> str:
    """submit_job, retried while the head answers that no job agent is up yet."""
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=spec.entrypoint, runtime_env=spec.runtime_env or None, **spec.options
            )
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1.0)
