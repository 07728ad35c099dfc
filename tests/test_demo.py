"""The demo: its mosaic archive and truth file, and (slow) the whole demo run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from anogan_batch.demo import GRID, PATCH_SIZE, load_sample, run_demo, write_mosaic_scans


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
    assert len(list((tmp_path / "job" / "overlays").rglob("*.png"))) == 24
