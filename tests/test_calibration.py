"""Calibrated decisions: conformal p-values, scan p-values, FDR, drift, train and calibrate."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anogan_batch.core.calibration import (
    benjamini_hochberg,
    bonferroni,
    conformal_p_values,
    drift,
    p_value_counts,
    score_threshold,
    split_by_scan,
)
from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.search_config import SearchConfig
from tests.conftest import TINY_TRAIN, make_patch_table


def binomial_upper(alpha: float, n: int, n_calibration: int = 0, z: float = 3.29) -> float:
    """99.95 % one-sided upper bound of an observed rate on n test points whose rate is alpha
    (given one calibration set of n_calibration, the rate itself varies by ~1/n_calibration)."""
    extra = 1 / n_calibration if n_calibration else 0.0
    return alpha + z * np.sqrt(alpha * (1 - alpha) * (1 / n + extra))


def test_p_values_are_the_conformal_ones():
    cal = np.array([1.0, 2.0, 3.0, 4.0])
    p = conformal_p_values(np.array([0.5, 2.0, 2.5, 9.0, np.nan]), cal)
    np.testing.assert_allclose(p[:4], [5 / 5, 4 / 5, 3 / 5, 1 / 5])
    assert np.isnan(p[4])


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 300), st.integers(0, 2**31 - 1), st.sampled_from([0.01, 0.05, 0.1]))
def test_normal_data_is_flagged_at_most_alpha_of_the_time(n, seed, alpha):
    # the guarantee is over both draws: a fresh calibration set and a test point, exchangeable
    # (all normal); P(p <= alpha) <= alpha for any score distribution
    trials = 5000
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, 3.0, (trials, n + 1))
    cal, test = scores[:, :n], scores[:, n]
    at_least = (cal >= test[:, None]).sum(axis=1)
    p = (1 + at_least) / (n + 1)
    np.testing.assert_allclose(p[:50], [conformal_p_values(test[i : i + 1], cal[i])[0]
                                        for i in range(50)])  # fmt: skip
    assert np.mean(p <= alpha) <= binomial_upper(alpha, trials)
    assert p.min() >= 1 / (n + 1) and p.max() <= 1


def test_the_score_threshold_is_where_p_crosses_alpha():
    cal = np.random.default_rng(3).normal(0, 1, 199)
    for alpha in (0.01, 0.05, 0.1):
        t = score_threshold(cal, alpha)
        s = np.concatenate([np.linspace(-4, 4, 10001), cal])
        assert np.array_equal(conformal_p_values(s, cal) <= alpha, s > t), alpha
    assert score_threshold(cal, 0.001) is None  # 1/(n+1) = 0.005: no score gets p <= 0.001


def test_a_miscalibrated_set_breaks_the_guarantee():
    # calibration scores that run low (e.g. the training patches, which G fits best): the
    # same check fails, so it can fail
    rng = np.random.default_rng(0)
    p = conformal_p_values(rng.normal(0, 1, 4000), rng.normal(-0.5, 1, 500))
    assert np.mean(p <= 0.05) > binomial_upper(0.05, 4000)


def test_scan_p_value_and_benjamini_hochberg():
    assert bonferroni(np.array([0.01, 0.5, np.nan, 0.2])) == pytest.approx(0.03)
    assert bonferroni(np.array([0.5, 0.9])) == 1.0 and np.isnan(bonferroni(np.array([np.nan])))
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, np.nan])
    flags, threshold = benjamini_hochberg(p, 0.05)
    assert flags.tolist() == [True, True] + [False] * 7 and threshold == 0.008
    assert not benjamini_hochberg(np.array([0.5, 0.9]), 0.05)[0].any()


def test_drift_sees_a_shift_without_labels():
    rng = np.random.default_rng(1)
    cal = np.sort(rng.normal(0, 1, 999))
    same = p_value_counts(conformal_p_values(rng.normal(0, 1, 5000), cal), 999)
    moved = p_value_counts(conformal_p_values(rng.normal(0.7, 1, 5000), cal), 999)
    quiet, loud = drift(same), drift(moved)
    assert not quiet["excess"] and quiet["ks_uniform"] < 0.05
    assert loud["excess"] and loud["ks_uniform"] > 0.2
    assert loud["share_p_le_alpha"] > 3 * 0.05


def test_whole_scans_stay_on_one_side():
    scans = [f"s{i // 5}" for i in range(5000)]
    held = split_by_scan(scans, 0.1, seed=0)
    by_scan: dict[str, set] = {}
    for s, h in zip(scans, held, strict=True):
        by_scan.setdefault(s, set()).add(bool(h))
    assert all(len(v) == 1 for v in by_scan.values())
    assert 0.07 < held.mean() < 0.13


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, sample):
    """A tiny model trained on zeros with 20 % of the scans held out for calibration."""
    from anogan_batch.core.training import train_gan

    root = tmp_path_factory.mktemp("calibrated")
    zeros = sample["train_images"][:1200]
    table = make_patch_table(root / "train", zeros)
    model = root / "model"
    train_gan(str(table), str(model), TrainConfig(**TINY_TRAIN, calibration_fraction=0.2),
              progress=False)  # fmt: skip
    return model


def test_train_holds_out_whole_scans_and_stores_their_scores(calibrated):
    doc = json.loads((calibrated / "model.json").read_text())
    (record,) = doc["calibration"].values()
    assert record["search"]["start"] == "encoder" and record["search"]["iterations"] == 10
    assert 150 < record["n"] < 330  # about 20 % of 1,200 one-patch scans
    assert doc["data"]["n_patches"] + doc["data"]["n_calibration_patches"] == 1200
    scores = pads.dataset(calibrated / record["file"]).to_table().column(0).to_numpy()
    assert len(scores) == record["n"] and np.all(np.diff(scores) >= 0)


def test_the_fpr_guarantee_holds_on_held_out_normal_digits(calibrated, sample):
    from anogan_batch.api import Detector

    det = Detector.load(str(calibrated))
    cal = det.calibration()
    assert cal is not None
    normal = sample["test_images"][sample["test_labels"] == 0]  # never seen by train
    p = conformal_p_values(det.score(normal).anomaly_score, cal)
    for alpha in (0.05, 0.1, 0.2):
        assert np.mean(p <= alpha) <= binomial_upper(alpha, len(p), len(cal)), alpha
    others = sample["test_images"][sample["test_labels"] != 0][:100]
    p_other = conformal_p_values(det.score(others).anomaly_score, cal)
    assert np.mean(p_other <= 0.1) > np.mean(p <= 0.1)  # anomalies get small p-values


def test_a_job_writes_p_values_flags_and_drift(calibrated, sample, tmp_path, ray_local):
    from anogan_batch.io.tables import write_patch_table
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    images = sample["test_images"][:40]
    labels = [str(v) for v in sample["test_labels"][:40]]
    scans = [f"scan{i // 4}" for i in range(40)]  # ten scans of four patches
    ids = [f"{s}#{i}" for i, s in enumerate(scans)]
    write_patch_table(str(tmp_path / "p"), images, labels, ids=ids, scan_ids=scans)
    m = run_score_job(
        ScoreJobConfig(str(calibrated), str(tmp_path / "p"), str(tmp_path / "job"),
                       progress=False, heatmaps=False, fpr=0.1, fdr=0.2)
    )  # fmt: skip
    rows = pads.dataset(tmp_path / "job" / "patch_scores", partitioning="hive").to_table()
    p = rows.column("p_value").to_numpy()
    assert np.all((p > 0) & (p <= 1))
    assert rows.column("flagged").to_pylist() == (p <= 0.1).tolist()
    scan_rows = pads.dataset(tmp_path / "job" / "scan_scores").to_table().to_pylist()
    by_scan = {}
    for r in rows.to_pylist():
        by_scan.setdefault(r["scan_id"], []).append(r["p_value"])
    for r in scan_rows:
        assert r["p_value"] == pytest.approx(bonferroni(np.array(by_scan[r["scan_id"]])))
    flags, _ = benjamini_hochberg(np.array([r["p_value"] for r in scan_rows]), 0.2)
    assert [r["flagged"] for r in scan_rows] == flags.tolist()
    assert m.decisions["patches_flagged"] == int((p <= 0.1).sum())
    assert m.decisions["scans_flagged"] == int(flags.sum())
    assert m.calibration["calibration_id"] and m.drift["n"] == 40


def test_calibrate_adds_a_search_and_a_job_without_one_says_why(
    calibrated, sample, tmp_path, ray_local
):
    import shutil

    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig
    from tests.conftest import run_cli

    model = tmp_path / "model"
    shutil.copytree(calibrated, model)
    before = json.loads((model / "model.json").read_text())
    site = make_patch_table(tmp_path / "site", sample["train_images"][1200:1300])
    r = run_cli("calibrate", str(model), str(site), "--iterations", "3", "--start", "prior")
    assert r.returncode == 0, r.stderr
    after = json.loads((model / "model.json").read_text())
    assert after["model_id"] == before["model_id"]  # weights untouched
    assert len(after["calibration"]) == 2
    new = next(v for k, v in after["calibration"].items() if k not in before["calibration"])
    assert new["n"] == 100 and new["data"]["source"] == str(site)

    table = make_patch_table(tmp_path / "t", sample["test_images"][:8])
    m = run_score_job(
        ScoreJobConfig(str(model), str(table), str(tmp_path / "job"), progress=False,
                       heatmaps=False, search=SearchConfig(iterations=4, start="prior"))
    )  # fmt: skip
    rows = pads.dataset(tmp_path / "job" / "patch_scores", partitioning="hive").to_table()
    assert rows.column("p_value").null_count == 8  # never a p-value from another search
    assert m.decisions["p_values"] is False and "no calibration" in m.decisions["why"]
    assert m.drift is None


def test_calibrate_names_the_patches_it_could_not_score_and_raises_device_faults(
    calibrated, sample, tmp_path, monkeypatch
):
    """calibrate scores through the job's loop (core/scoring.py): a patch whose search fails on
    its own is left out and named in the record; a fault of the device is never a dropped row."""
    import shutil

    from anogan_batch.core import search as search_module
    from anogan_batch.core.calibrating import calibrate_arrays

    model = tmp_path / "model"
    shutil.copytree(calibrated, model)
    pixels = sample["train_images"][1200:1300][..., None]
    ids = [f"site-{i}" for i in range(100)]
    real = search_module.latent_search

    def failing_on(bad: str, error: Exception):
        def search(g, d, x, patch_ids, cfg, encoder=None):
            if bad in patch_ids:
                raise error
            return real(g, d, x, patch_ids, cfg, encoder)

        return search

    monkeypatch.setattr(search_module, "latent_search",
                        failing_on("site-7", RuntimeError("injected fault")))  # fmt: skip
    search = SearchConfig(iterations=2, start="prior")
    r = calibrate_arrays(str(model), pixels, ids, data={"source": "t"}, search=search)
    assert r["n"] == 99
    record = json.loads((model / "model.json").read_text())["calibration"][r["search_key"]]
    assert record["data"]["excluded"] == 1
    assert record["data"]["excluded_example"] == [
        "site-7",
        "scoring failed: RuntimeError: injected fault",
    ]
    device_fault = RuntimeError("CUDA error: unspecified launch failure")
    monkeypatch.setattr(search_module, "latent_search", failing_on("site-7", device_fault))
    with pytest.raises(RuntimeError, match="CUDA error"):
        calibrate_arrays(str(model), pixels, ids, data={"source": "t"}, search=search)


def tinted_share(png_path) -> float:
    """Share of an overlay's pixels that carry colour (the scan underneath is gray)."""
    from PIL import Image

    rgb = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    return float(((rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])).mean())


def test_overlays_are_coloured_on_the_models_normal_scale(calibrated, sample, tmp_path, ray_local):
    """The calibration records how its normal pixels' smoothed residuals spread; overlays are
    tinted above their 99th percentile, so a normal scan stays (nearly) dark."""
    from anogan_batch.core.calibration import HEAT_QUANTILES
    from anogan_batch.io.tables import write_patch_table
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    (record,) = json.loads((calibrated / "model.json").read_text())["calibration"].values()
    heat = record["heat"]
    assert heat["quantiles"] == list(HEAT_QUANTILES) and 0 < heat["floor"] < heat["full"]
    zeros = sample["test_images"][sample["test_labels"] == 0][:12]
    others = sample["test_images"][sample["test_labels"] != 0][:12]
    labels = ["0"] * len(zeros) + ["1"] * len(others)
    ids = [f"s{i:02d}" for i in range(len(labels))]
    write_patch_table(str(tmp_path / "p"), np.concatenate([zeros, others]), labels, ids=ids,
                      scan_ids=ids)  # fmt: skip
    m = run_score_job(
        ScoreJobConfig(str(calibrated), str(tmp_path / "p"), str(tmp_path / "job"),
                       progress=False)  # the calibrated search: score's default
    )  # fmt: skip
    scale = m.runs[-1]["overlay_scale"]
    assert scale == {"tinted_from": heat["floor"], "full_from": heat["full"],
                     "anchored": "calibration"}  # fmt: skip
    overlays = tmp_path / "job" / "overlays"
    shares = {i: tinted_share(next(overlays.glob(f"{i}-*.png"))) for i in ids}
    normal = np.mean([shares[i] for i, lab in zip(ids, labels, strict=True) if lab == "0"])
    assert normal < 0.05  # about 1 %: the 99th percentile of normal pixels tints them


@pytest.mark.slow  # the bundled model's calibration search over 300 patches: ~40 s
def test_a_calibrated_scale_darkens_normal_digits_and_keeps_anomalies_hot(sample, tmp_path):
    """On the bundled model (trained on zeros): the share of tinted pixels of normal digits
    and of other digits, under the calibrated scale and the fixed one."""
    import shutil

    import torch

    from anogan_batch.core.calibrating import calibrate_arrays
    from anogan_batch.core.calibration import box_blur, cell_means, heat_blur_cells, heat_cell
    from anogan_batch.core.modeldir import load_model
    from anogan_batch.core.scoring import search_batch
    from anogan_batch.core.search import resolve_search
    from anogan_batch.evaluation.demo import bundled_model_dir
    from anogan_batch.job.heatmaps import HEAT_FLOOR

    model_dir = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), model_dir)
    normal = sample["calibration_images"][:200][..., None]
    r = calibrate_arrays(str(model_dir), normal, [f"c{i}" for i in range(200)], data={})
    heat = json.loads((model_dir / "model.json").read_text())["calibration"][r["search_key"]]
    floor = heat["heat"]["floor"]
    model = load_model(str(model_dir)).for_scoring("cpu")
    search = resolve_search(SearchConfig(), has_encoder=True)

    def tinted(images: np.ndarray, above: float) -> float:
        ids = [f"t{i}" for i in range(len(images))]
        found = search_batch(model, torch.from_numpy(images[..., None]), ids, search, "cpu")
        side = images.shape[1]
        cells = cell_means(found.residual_map, heat_cell(side))
        return float(np.mean([(box_blur(g, heat_blur_cells(side)) > above).mean()
                              for g in cells]))  # fmt: skip

    zeros = sample["test_images"][sample["test_labels"] == 0][:50]
    others = sample["test_images"][sample["test_labels"] != 0][:50]
    calibrated = tinted(zeros, floor), tinted(others, floor)
    fixed = tinted(zeros, HEAT_FLOOR), tinted(others, HEAT_FLOOR)
    # measured: normal 1.1 % vs 30 % on the fixed scale; other digits 25 % vs 52 %
    assert calibrated[0] < 0.03 and calibrated[1] > 8 * calibrated[0], calibrated
    assert calibrated[1] / calibrated[0] > 3 * fixed[1] / fixed[0], (calibrated, fixed)
