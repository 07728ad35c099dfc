"""Everything of Ray that is not Ray's public API, in one place.

Exactly-once scoring rests on Ray Data's checkpointing, whose on-disk protocol is Ray's own: a
write task records the ids it is about to write in `<base>.pending.parquet` under the
checkpoint folder, writes its data files named `<base>-...`, then renames the pending file to
commit. `JobSink` (pipeline.py) writes two tables from one task, so it needs the task's `<base>`
(`task_file_base`), and a rerun must delete the data files of uncommitted writes in both tables
(`pending_bases`), which Ray only does for one folder. Both depend on Ray internals and file
naming that may change in any minor version, so they live here with the connection and
DataContext settings, and `check_ray_version` refuses a minor version they were not tested on.

Tested against: Ray 2.60 (TESTED_RAY_MINORS). To support a new minor version, run the resume,
crash and cluster tests on it (tests/test_resume.py, test_crash.py, test_cluster.py), then add it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from collections.abc import Iterator
from typing import Any

TESTED_RAY_MINORS = ("2.60",)
PENDING_SUFFIX = ".pending.parquet"  # Ray Data's uncommitted checkpoint file
RAY_NOISE = (  # loggers whose lines are not news to our users
    "ray._private.authentication.authentication_token_setup",  # token auth's notice
    "ray.data._internal.progress",
)


class UntestedRayVersion(RuntimeError):
    pass


def check_ray_version(version: str | None = None) -> None:
    """Raise if Ray's minor version is not one the checkpoint protocol was tested on."""
    if version is None:
        import ray

        version = ray.__version__
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_RAY_MINORS:
        raise UntestedRayVersion(
            f"Ray {version} is installed, but anogan-batch's exactly-once checkpointing is "
            f"tested on Ray {', '.join(TESTED_RAY_MINORS)} only (anogan_batch/job/raykit.py): "
            "install a tested version, or run the resume and crash tests on this one first"
        )


def connect_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one sized for this machine.

    A local cluster advertises two logical CPUs more than the machine has: the scoring actor
    holds the real cores, and the light I/O tasks (and Ray Data's checkpoint filter actor,
    which always asks for one CPU) must still be schedulable, or a 2-core machine hangs.
    """
    import ray

    if ray.is_initialized():
        return
    check_ray_version()
    for name in RAY_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a fresh cluster, never one left running by someone else
        ray.init(
            address="local", num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, **kwargs
        )


@contextlib.contextmanager
def job_data_context(**settings: Any) -> Iterator[Any]:
    """Ray Data's process-wide DataContext set up for a job (quiet, one retry policy, plus
    `settings`), and put back as the caller had it when the job ends: a notebook that runs a
    job keeps its own progress bars and checkpoint settings."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    wanted = {
        # our own progress line replaces Ray Data's per-operator bars and their log spam
        "enable_progress_bars": False,
        "print_on_execution_start": False,
        # One retry policy for S3, ours (io/s3.py), not Ray's on top of it: Ray's own I/O
        # retry on top of the SDK's would stretch a dead endpoint's failure to many minutes.
        "retried_io_errors": [],
        **settings,
    }
    saved = {name: getattr(ctx, name) for name in wanted}
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    for name, value in wanted.items():
        setattr(ctx, name, value)
    data_logger.setLevel(logging.WARNING)
    try:
        yield ctx
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        data_logger.setLevel(saved_level)


def task_file_base(sink: Any, ctx: Any) -> str:
    """The base name of a write task's files, which is also its pending checkpoint's name:
    a sink that writes several files per task must start each name with it."""
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data.datasource.filename_provider import _split_base_and_ext

    name = sink.filename_provider.get_filename_for_task(
        ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
    )
    return _split_base_and_ext(name)[0]


def pending_bases(fs: Any, checkpoint_dir: str) -> list[tuple[str, str]]:
    """(path of the pending checkpoint file, base of its task's data files) of every write that
    started but did not commit."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(checkpoint_dir, recursive=False, allow_not_found=True)
    return [
        (f.path, posixpath.basename(f.path)[: -len(PENDING_SUFFIX)])
        for f in fs.get_file_info(selector)
        if f.path.endswith(PENDING_SUFFIX)
    ]
