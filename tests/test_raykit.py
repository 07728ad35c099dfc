"""Ray's internals behind job/raykit.py: the version pin and the job's DataContext."""

from __future__ import annotations

import pytest

from anogan_batch.job.raykit import (
    TESTED_RAY_MINORS,
    UntestedRayVersion,
    check_ray_version,
    job_data_context,
)


def test_the_installed_ray_is_a_tested_one():
    import ray

    check_ray_version()  # raises, naming raykit.py, if someone bumps Ray without the tests
    assert ".".join(ray.__version__.split(".")[:2]) in TESTED_RAY_MINORS


@pytest.mark.parametrize("version", ["2.61.0", "3.0.0", "2.59.1"])
def test_an_untested_ray_minor_is_refused_with_a_clear_message(version):
    with pytest.raises(UntestedRayVersion, match=rf"Ray {version} .*raykit\.py"):
        check_ray_version(version)


def test_a_job_puts_the_callers_data_context_back():
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    mine = ["my-error"]
    ctx.retried_io_errors = mine
    with job_data_context(checkpoint_config=None) as inside:
        assert inside.enable_progress_bars is False and inside.retried_io_errors == []
    assert ctx.enable_progress_bars is True and ctx.retried_io_errors is mine

    with pytest.raises(RuntimeError), job_data_context():
        raise RuntimeError("a failed job")
    assert ctx.enable_progress_bars is True  # also after a failure
