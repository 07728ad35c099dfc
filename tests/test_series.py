"""DICOM series into volumes (ingest/series.py), and ingest of a series in position order, from
files the generators in tests/volumes.py write with pydicom."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from anogan_batch.ingest import series
from anogan_batch.job.ingest import ingest
from anogan_batch.job.ingest_config import IngestConfig
from tests.volumes import write_series


def headers(folder) -> list[series.SliceHeader]:
    out = []
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as fh:
            out.append(series.read_header(fh, path.name))
    return out


def test_slices_are_ordered_by_position_and_the_scout_is_its_own(tmp_path):
    made = write_series(tmp_path / "ct", 12)
    volumes = series.group(headers(tmp_path / "ct"))
    big = max(volumes, key=lambda v: len(v.names))
    assert big.names == made["order"] and big.ordered_by == "position"
    assert big.spacing == 2.5 and big.problems == [] and big.series == made["series"]
    others = [v for v in volumes if v is not big]
    assert [v.names for v in others] == [["SCOUT.dcm"]]  # another orientation: not a slice


def test_a_gap_and_a_duplicate_split_the_volume_and_are_reported(tmp_path):
    made = write_series(tmp_path / "gap", 10, gap_after=3, scout=False)
    (first, second) = series.group(headers(tmp_path / "gap"))
    assert first.names == made["order"][:4] and second.names == made["order"][4:]
    assert "gap of 10 before" in first.problems[0] and second.part == 1
    made = write_series(tmp_path / "dup", 6, duplicate=2, scout=False, seed=3)
    volumes = series.group(headers(tmp_path / "dup"))
    assert sum(len(v.names) for v in volumes) == 7 and len(volumes) == 2
    assert any("duplicate position" in p for v in volumes for p in v.problems)


def test_without_positions_instance_numbers_then_names_order_the_slices():
    plain = [series.SliceHeader(name=f"s{k}", series="1.2", instance=n, rows=4, columns=4)
             for k, n in enumerate([3, 1, 2])]  # fmt: skip
    (volume,) = series.group(plain)
    assert volume.names == ["s1", "s2", "s0"] and volume.ordered_by == "instance"
    named = [series.SliceHeader(name=n, series="1.2", rows=4, columns=4) for n in "cab"]
    (volume,) = series.group(named)
    assert volume.names == ["a", "b", "c"] and volume.ordered_by == "name"


def test_a_series_ingests_as_one_volume_in_position_order(tmp_path):
    made = write_series(tmp_path / "src" / "ct", 12)
    summary = ingest(str(tmp_path / "src"), str(tmp_path / "out"),
                     IngestConfig(patch_size=16, window=(2048, 4096), engine="local"))  # fmt: skip
    scans = pq.read_table(tmp_path / "out" / "_scans.parquet").to_pylist()
    volume = f"ct/{made['series']}"
    slices = sorted((s for s in scans if s["scan_id"] == volume), key=lambda s: s["slice"])
    assert [s["slice"] for s in slices] == list(range(12))  # one scan, a row a slice
    assert [s["path"].rsplit("/", 1)[1] for s in slices] == made["order"]
    about = json.loads(slices[0]["source"])
    assert (about["ordered_by"], about["slices"], about["spacing"]) == ("position", 12, 2.5)
    assert {s["scan_id"] for s in scans} == {volume, "ct/SCOUT"}  # the scout on its own
    assert summary.scans == 2
    rows = pads.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    assert summary.patches == len(rows) == 13 * 4 and summary.files == 13
    for r in rows:  # slice k holds 100 + k: the position order, whatever the file names
        if r["scan_id"] == volume:
            assert r["patch_id"].startswith(f"{volume}@{r['slice']:04d}#")
            value = np.frombuffer(r["image"], "<u2")[0]
            assert value == round((100 + r["slice"]) / 4096 * 65535), (r["slice"], value)
