"""The notebook API: Detector.load / fit / score / save, and the same numbers as a job."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest

import anogan_batch
from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.io.patches import decode_map
from tests.conftest import TINY_TRAIN, make_patch_table


def test_a_detector_scores_like_the_job(tmp_path, tiny_model, sample, ray_local):
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    images = sample["test_images"][:12]
    ids = [f"digit-{i}" for i in range(12)]
    table = make_patch_table(tmp_path / "patches", images, ids=ids)
    search = SearchConfig(iterations=8, start="prior")  # the prior start is seeded by patch_id
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.checkpoint_config)
    run_score_job(
        ScoreJobConfig(tiny_model, str(table), str(tmp_path / "job"), search=search,
                       progress=False, heatmaps=False)
    )  # fmt: skip
    # the process-wide DataContext is the caller's again (a notebook keeps its settings)
    assert (ctx.enable_progress_bars, ctx.checkpoint_config) == before
    job = pads.dataset(tmp_path / "job" / "patch_scores", partitioning="hive").to_table()
    job = job.sort_by("patch_id").to_pylist()

    det = anogan_batch.Detector.load(tiny_model, search=search, device="cpu")
    got = det.score(images, ids=ids)
    order = np.argsort(ids)
    for k, row in zip(order, job, strict=True):
        assert row["patch_id"] == ids[k]
        assert got.anomaly_score[k] == pytest.approx(row["anomaly_score"], rel=1e-5)
        assert got.residual_score[k] == pytest.approx(row["residual_score"], rel=1e-5)
        assert got.discrimination_score[k] == pytest.approx(row["discrimination_score"], rel=1e-5)
        # the job stores compact (float16) maps, the Detector float32 ones
        residual_map = decode_map(row["residual_map"], 28, 28, 1)
        np.testing.assert_allclose(got.residual_map[k], residual_map, rtol=2**-11, atol=1e-6)
    assert got.reason == [None] * 12
    # pyod's name for the score (default ids '0', '1', ... seed the prior start)
    np.testing.assert_array_equal(
        det.decision_function(images[:3]), det.score(images[:3]).anomaly_score
    )


def test_fit_save_load_round_trip_and_higher_is_more_anomalous(tmp_path, sample):
    zeros = sample["train_images"][:512]
    det = anogan_batch.Detector.fit(zeros, TrainConfig(**TINY_TRAIN))
    normal, other = sample["test_images"][sample["test_labels"] == 0][:20], None
    other = sample["test_images"][sample["test_labels"] != 0][:20]
    before = det.score(np.concatenate([normal, other]))
    model_id = det.save(str(tmp_path / "model"))
    assert model_id == det.model.model_id  # the id fit announced is the one saved
    again = anogan_batch.Detector.load(str(tmp_path / "model")).score(
        np.concatenate([normal, other])
    )
    np.testing.assert_allclose(again.anomaly_score, before.anomaly_score, rtol=1e-5)
    # the contract: higher = more anomalous (other digits than the normal zeros)
    assert np.median(before.anomaly_score[20:]) > np.median(before.anomaly_score[:20])


def test_a_patch_of_the_wrong_size_is_reported_not_scored(tiny_model):
    det = anogan_batch.Detector.load(tiny_model, search=SearchConfig(iterations=2))
    got = det.score(np.zeros((2, 32, 32), np.uint8))
    assert np.isnan(got.anomaly_score).all() and np.isnan(got.residual_map).all()
    assert all("32x32" in r for r in got.reason)


def test_importing_the_package_stays_light():
    code = "import sys, anogan_batch; print('torch' in sys.modules, anogan_batch.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", anogan_batch.__version__]
