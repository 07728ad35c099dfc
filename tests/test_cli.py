"""The real `anogan-batch` entry point: the end-to-end flow and exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anogan_batch.io.patches import PATCH_SCHEMA
from tests.conftest import ERROR_LINE, make_patch_table, run_cli


def assert_user_error(result, *needles: str) -> None:
    """Exit 2, a message naming the culprit, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for cmd in ("ingest", "train", "score", "eval", "report", "heatmap", "demo", "bench"):
        assert cmd in result.stdout


def test_end_to_end_ingest_train_score_eval_report(tmp_path):
    from anogan_batch.evaluation.demo import write_sample_scans

    scans = tmp_path / "scans"
    assert write_sample_scans(str(scans), split="test") == 300
    r = run_cli(
        "ingest", str(scans), str(tmp_path / "patches"), "--patch-size", "28", "--label-from-parent"
    )
    assert r.returncode == 0, r.stderr
    assert "300 patches" in r.stdout
    r = run_cli(
        "train",
        str(tmp_path / "patches"),
        str(tmp_path / "model"),
        "--normal-label",
        "0",
        "--epochs",
        "3",
        "--g-width",
        "8",
        "--d-width",
        "8",
        "--latent-dim",
        "16",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "score",
        str(tmp_path / "model"),
        str(tmp_path / "patches"),
        str(tmp_path / "job"),
        "--iterations",
        "5",
        "--batch-size",
        "50",
        "--actors",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "scored 300/300 patches |" in r.stderr and "patches/s | ETA" in r.stderr  # progress
    assert not ERROR_LINE.search(r.stderr), r.stderr[-3000:]  # a healthy job: no error line
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["status"] == "succeeded" and job["scored_rows"] == 300
    r = run_cli("eval", str(tmp_path / "job"), "--normal-label", "0")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert set(metrics) >= {"auroc", "auprc", "n_normal", "n_anomalous"}
    assert (metrics["n_normal"], metrics["n_anomalous"]) == (150, 150)
    assert f"AUROC {metrics['auroc']:.4f}" in r.stdout
    r = run_cli("report", str(tmp_path / "job"))
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "job" / "report.html").read_text()
    assert job["job_id"] in html and html.count("data:image/png;base64,") >= 3 * 16


@pytest.fixture(scope="module")
def table_32(tmp_path_factory, sample):
    pixels = np.zeros((4, 32, 32), np.uint8)
    return make_patch_table(tmp_path_factory.mktemp("t32") / "p", pixels)


def test_missing_required_column(tmp_path, tiny_model, test_table):
    bad = tmp_path / "bad"
    bad.mkdir()
    t = pq.read_table(f"{test_table}/part-00000.parquet").drop_columns(["scan_id"])
    pq.write_table(t, bad / "part.parquet")
    r = run_cli("score", tiny_model, str(bad), str(tmp_path / "o"))
    assert_user_error(r, "no column 'scan_id'", str(bad))


def test_patches_of_the_wrong_size(tmp_path, tiny_model, table_32):
    r = run_cli("score", tiny_model, str(table_32), str(tmp_path / "o"))
    assert_user_error(r, "does not fit model", "patch is 32x32x1, model expects 28x28x1")


def test_patches_with_the_wrong_channel_count(tmp_path, tiny_model):
    table = make_patch_table(tmp_path / "rgb", np.zeros((3, 28, 28, 3), np.uint8))
    r = run_cli("score", tiny_model, str(table), str(tmp_path / "o"))
    assert_user_error(r, "patch is 28x28x3, model expects 28x28x1")


def test_empty_table(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    pq.write_table(PATCH_SCHEMA.empty_table(), tmp_path / "empty" / "part.parquet")
    r = run_cli("score", tiny_model, str(tmp_path / "empty"), str(tmp_path / "o"))
    assert_user_error(r, "is empty")


def test_table_that_does_not_exist(tmp_path, tiny_model):
    r = run_cli("score", tiny_model, str(tmp_path / "nope"), str(tmp_path / "o"))
    assert_user_error(r, "nope' does not exist")


def test_missing_model_directory(tmp_path, test_table):
    r = run_cli("score", str(tmp_path / "no-model"), test_table, str(tmp_path / "o"))
    assert_user_error(r, "model directory", "no-model' does not exist")


def test_corrupt_model_directory(tmp_path, tiny_model, test_table):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "weights.safetensors").write_bytes(b"\x00" * 100)
    r = run_cli("score", str(model), test_table, str(tmp_path / "o"))
    assert_user_error(r, "weights.safetensors", "corrupt")


def test_model_json_for_another_architecture(tmp_path, tiny_model, test_table):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    doc = json.loads((model / "model.json").read_text())
    doc["architecture"]["d_width"] = 64
    (model / "model.json").write_text(json.dumps(doc))
    r = run_cli("score", str(model), test_table, str(tmp_path / "o"))
    assert_user_error(r, "model.json", "discriminator")


def test_all_rows_bad_is_exit_2_after_quarantine(tmp_path, tiny_model):
    t = make_patch_table(tmp_path / "p", np.zeros((3, 28, 28), np.uint8))
    tbl = pq.read_table(t / "part-00000.parquet")
    tbl = tbl.set_column(
        tbl.schema.get_field_index("image"), "image", pa.array([b"\x00"] * 3, pa.binary())
    )
    tbl = tbl.drop_columns(["height", "width", "channels", "dtype"])
    (t / "part-00000.parquet").unlink()
    pq.write_table(tbl, t / "part.parquet")
    r = run_cli(
        "score", tiny_model, str(t), str(tmp_path / "o"), "--iterations", "2", "--no-progress"
    )
    # preflight sees the first row's byte length does not fit the model
    assert_user_error(r, "image has 1 bytes, 28x28x1 uint8 needs 784")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--iterations", "-3"], "'iterations': -3"),
        (["--lambda", "2"], "'lambda': 2.0"),
        (["--actors", "two"], "'actors': 'two'"),
        (["--batch-size", "0"], "'batch_size': 0"),
        (["--precision", "fp8"], "'precision': 'fp8'"),
        (["--table-format", "csv"], "'table_format': 'csv'"),
        (["--stop-tol", "-1"], "'stop_tol': -1.0"),
        (["--start", "middle"], "'start': 'middle'"),
    ],
)
def test_bad_flag_values(tmp_path, tiny_model, test_table, args, needle):
    r = run_cli("score", tiny_model, test_table, str(tmp_path / "o"), *args)
    assert_user_error(r, needle)


def test_encoder_start_needs_a_model_with_an_encoder(tmp_path, loaded_tiny, test_table):
    from dataclasses import replace

    from anogan_batch.core.modeldir import save_model

    m = loaded_tiny
    plain = str(tmp_path / "plain")
    save_model(plain, replace(m.config, encoder=False), m.generator, m.discriminator, {})
    r = run_cli("score", plain, test_table, str(tmp_path / "o"), "--start", "encoder")
    assert_user_error(r, "'start': 'encoder' (the model has no encoder")


def test_unknown_flag_is_usage_error(tiny_model):
    r = run_cli("score", tiny_model, "--frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--window", "40"], "'--window': '40'"),
        (["--window", "40,0"], "'window width': 0.0"),
        (["--slice-axis", "5"], "'slice_axis': 5"),
        (["--min-foreground", "1.5"], "'min_foreground': 1.5"),
        (["--engine", "spark"], "'engine': 'spark'"),
    ],
)
def test_bad_ingest_flags(tmp_path, args, needle):
    r = run_cli("ingest", str(tmp_path), str(tmp_path / "o"), "--patch-size", "16", *args)
    assert_user_error(r, needle)


@pytest.mark.parametrize("classes", ["42", "-1", "3,x", ""])
def test_bench_quality_classes_must_be_digits(tmp_path, classes):
    """--classes picks MNIST digits: anything but 0-9 is exit 2 naming the flag, before any
    data is read (a digit with no images used to end in a traceback from the range fit)."""
    r = run_cli("bench", "--quality", "mnist", "--classes", classes, "--out", str(tmp_path))
    assert_user_error(r, "--classes")


def test_bad_train_flag(tmp_path, test_table):
    r = run_cli("train", test_table, str(tmp_path / "m"), "--d-norm", "layer")
    assert_user_error(r, "'d_norm': 'layer'")
    r = run_cli("train", test_table, str(tmp_path / "m"), "--input-norm", "zscore")
    assert_user_error(r, "'input_norm': 'zscore'")
    r = run_cli("train", test_table, str(tmp_path / "m"), "--input-blur", "-1")
    assert_user_error(r, "'input_blur': -1.0")
    # a negative index parses (-1 is the last block); 28x28 patches give D two blocks
    r = run_cli("train", test_table, str(tmp_path / "m"), "--feature-layer", "-3")
    assert_user_error(r, "'feature_layer': -3")


def test_ingest_patch_size_too_small(tmp_path):
    r = run_cli("ingest", str(tmp_path), str(tmp_path / "o"), "--patch-size", "2")
    assert_user_error(r, "'patch_size': 2")


@pytest.fixture(scope="module")
def float_model_cli(tmp_path_factory, sample):
    root = tmp_path_factory.mktemp("fm")
    make_patch_table(root / "t", sample["train_images"][:128].astype(np.float32) / 255)
    r = run_cli(
        "train",
        str(root / "t"),
        str(root / "m"),
        "--epochs",
        "1",
        "--g-width",
        "4",
        "--d-width",
        "4",
        "--latent-dim",
        "8",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    return str(root / "m")


def test_nan_rows_are_quarantined_and_the_rest_scored(tmp_path, float_model_cli, sample):
    pixels = sample["test_images"][:6].astype(np.float32) / 255
    pixels[1, 3, 3] = np.nan
    table = make_patch_table(tmp_path / "p", pixels)
    r = run_cli(
        "score",
        float_model_cli,
        str(table),
        str(tmp_path / "o"),
        "--iterations",
        "2",
        "--no-progress",
        "--no-heatmaps",  # quarantine is the point here; heatmaps have their own tests
    )
    assert r.returncode == 0, r.stderr
    assert "5 scored, 1 quarantined of 6 rows" in r.stdout


def test_all_rows_nan_is_exit_2(tmp_path, float_model_cli):
    pixels = np.full((4, 28, 28), np.inf, np.float32)
    table = make_patch_table(tmp_path / "p", pixels)
    r = run_cli(
        "score",
        float_model_cli,
        str(table),
        str(tmp_path / "o"),
        "--iterations",
        "2",
        "--no-progress",
    )
    assert_user_error(r, "no row of", "could be scored", "784 NaN/inf pixels")
    job = json.loads((tmp_path / "o" / "job.json").read_text())
    assert (job["status"], job["quarantined_rows"]) == ("succeeded", 4)
