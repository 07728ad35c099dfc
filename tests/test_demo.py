"""The demo: its mosaic archive and truth file, and (slow) the whole demo run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anogan_batch.evaluation.demo import (
    GRID,
    NORMAL_LABEL,
    PATCH_SIZE,
    TRAIN_ARGS,
    bundled_model_dir,
    load_sample,
    run_demo,
    write_mosaic_scans,
)


def test_mosaic_archive_and_truth_agree(tmp_path):
    n_scans, n_lesions = write_mosaic_scans(str(tmp_path / "scans"), str(tmp_path / "t.csv"))
    truth = list(csv.DictReader((tmp_path / "t.csv").read_text().splitlines()))
    assert len(truth) == n_scans * GRID * GRID and n_lesions == 18
    assert sum(r["label"] == "lesion" for r in truth) == n_lesions
    sample = load_sample()
    lesion_digits = {d.tobytes() for d in sample["lesion_images"]}
    for row in truth:
        scan_id, geometry = row["patch_id"].split("#")
        x, y = (int(v) for v in geometry.split("+")[1:])
        scan = np.asarray(Image.open(tmp_path / "scans" / f"{scan_id}.png"))
        assert scan.shape == (GRID * PATCH_SIZE, GRID * PATCH_SIZE)
        tile = scan[y : y + PATCH_SIZE, x : x + PATCH_SIZE]
        assert (tile.tobytes() in lesion_digits) == (row["label"] == "lesion"), row
        assert scan_id.startswith("lesion/") or row["label"] == "normal"
    # deterministic: the same archive again
    write_mosaic_scans(str(tmp_path / "again"), str(tmp_path / "t2.csv"))
    assert (tmp_path / "t.csv").read_text() == (tmp_path / "t2.csv").read_text()


@pytest.mark.slow
def test_demo_runs_and_finds_the_lesions(tmp_path, capsys):
    metrics = run_demo(str(tmp_path))  # score's default search: the bundled encoder + polish
    assert metrics["auroc"] >= 0.95 and metrics["scan"]["auroc"] >= 0.8
    out = capsys.readouterr().out
    assert "patch AUROC" in out and "scan  AUROC" in out
    assert "scans flagged at FDR 0.1" in out  # the bundled calibration gives p-values
    assert len(list((tmp_path / "job" / "overlays").rglob("*.png"))) == 24
    # the overlays colour the lesions and leave normal tissue dark (docs/calibration.md)
    shares = metrics["overlays"]
    assert shares["coloured_in_lesion_tiles"] >= 0.8 and shares["normal_scans_coloured"] <= 0.01
    assert "of coloured pixels in lesion tiles" in out


def test_bundled_model_and_its_retrain_script_follow_train_args():
    """The recipe is written twice (demo.TRAIN_ARGS for `demo --train`, CLI flags in
    scripts/train_demo_model.sh); both must be the recipe the bundled model was trained with,
    and the rest of it train's defaults: a changed default means a retrained demo model."""
    from dataclasses import asdict

    from anogan_batch.core.model_config import TrainConfig
    from anogan_batch.core.modeldir import load_model

    cfg = load_model(bundled_model_dir()).config
    training = json.loads((Path(bundled_model_dir()) / "model.json").read_text())["training"]
    script = (Path(__file__).parents[1] / "scripts" / "train_demo_model.sh").read_text()
    flags = " ".join(script.replace("\\\n", " ").split())
    for key, value in TRAIN_ARGS.items():
        recorded = getattr(cfg, key) if hasattr(cfg, key) else training[key]
        assert recorded == value, key
        assert f"--{key.replace('_', '-')} {value}" in flags, key
    expected = asdict(TrainConfig(normal_label=NORMAL_LABEL, **TRAIN_ARGS))
    expected.pop("device")  # None asks for the best device; model.json records the one used
    assert {k: training[k] for k in expected} == expected


def test_the_bundled_calibration_is_held_out_zeros_for_score_s_default_search():
    from anogan_batch.core.modeldir import read_calibration, read_model_card
    from anogan_batch.core.search import resolve_search
    from anogan_batch.core.search_config import SearchConfig

    card = read_model_card(bundled_model_dir())
    scores, record = read_calibration(card, resolve_search(SearchConfig(), has_encoder=True))
    assert scores is not None and len(scores) == record["n"] == 500
    sample = load_sample()
    held_out = set(sample["calibration_index"].tolist())
    assert not held_out & set(sample["train_index"].tolist())  # never trained on
    assert not held_out & set(sample["test_index"].tolist())
    tiles = {t.tobytes() for t in sample["tile_images"]}  # never in a demo scan
    assert not any(img.tobytes() in tiles for img in sample["calibration_images"])
    assert set(sample["calibration_labels"].tolist()) == {0}
