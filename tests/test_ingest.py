"""Ingest: scans -> patch table with the contract's columns, stable ids, labels, bad files."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anogan_batch.errors import InputError
from anogan_batch.ingest.plan import grid_positions
from anogan_batch.io.patches import PatchSpec, decode_patches
from anogan_batch.job.ingest import ingest
from anogan_batch.job.ingest_config import IngestConfig
from tests.corpus import write_dicom


@pytest.fixture
def scans(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "scans"
    (root / "normal").mkdir(parents=True)
    (root / "lesion" / "deep").mkdir(parents=True)
    gray = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(gray).save(root / "normal" / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        root / "lesion" / "b.jpg", quality=95
    )
    Image.fromarray(rng.integers(0, 60000, (20, 20)).astype(np.uint16)).save(
        root / "lesion" / "deep" / "c.png"
    )
    return root, gray


def test_grid_covers_the_border():
    assert grid_positions(40, 16, 16) == [0, 16, 24]
    assert grid_positions(32, 16, 16) == [0, 16]
    assert grid_positions(10, 16, 16) == []
    assert grid_positions(20, 16, 2) == [0, 2, 4]


def test_ingest_png_jpeg_and_16_bit(scans, tmp_path):
    root, gray = scans
    out = tmp_path / "patches"
    summary = ingest(str(root), str(out), IngestConfig(patch_size=16, label_from_parent=True))
    table = pads.dataset(out).to_table().sort_by("patch_id")
    # a.png 40x50 -> 3 x 4 patches, b.jpg 32x32 -> 2 x 2, c.png 20x20 -> 2 x 2
    assert summary.patches == table.num_rows == 12 + 4 + 4
    assert summary.scans == 3
    rows = {r["patch_id"]: r for r in table.to_pylist()}
    a = rows["normal/a#16x16+16+24"]
    assert (a["scan_id"], a["x"], a["y"], a["label"]) == ("normal/a", 16, 24, "normal")
    pixels, _ = decode_patches(
        table.filter(pads.field("patch_id") == a["patch_id"]), PatchSpec(16, 1, "uint8")
    )
    np.testing.assert_array_equal(pixels[0, :, :, 0], gray[24:40, 16:32])  # lossless
    assert rows["lesion/b#16x16+0+0"]["channels"] == 3
    c = rows["lesion/deep/c#16x16+4+4"]
    assert (c["dtype"], c["label"]) == ("uint16", "deep")
    assert set(pq.read_schema(next(out.glob("part-*.parquet"))).names) >= {
        "patch_id",
        "scan_id",
        "x",
        "y",
        "image",
        "label",
    }


def test_patch_ids_are_stable_across_reingest(scans, tmp_path):
    root, _ = scans
    a = ingest(str(root), str(tmp_path / "a"), IngestConfig(patch_size=16))
    b = ingest(str(root), str(tmp_path / "b"), IngestConfig(patch_size=16))
    ta = pads.dataset(tmp_path / "a").to_table().sort_by("patch_id")
    tb = pads.dataset(tmp_path / "b").to_table().sort_by("patch_id")
    assert a.patches == b.patches
    assert ta.column("patch_id").to_pylist() == tb.column("patch_id").to_pylist()
    assert ta.column("image").equals(tb.column("image"))
    assert len(set(ta.column("patch_id").to_pylist())) == ta.num_rows


def test_bad_files_are_quarantined_not_fatal(scans, tmp_path):
    root, _ = scans
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "normal" / "empty.png").write_bytes(b"")
    (root / "normal" / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "normal" / "tiny.png")
    out = tmp_path / "patches"
    summary = ingest(str(root), str(out), IngestConfig(patch_size=16))
    assert summary.quarantined == 4
    q = pq.read_table(out / "_quarantine.parquet").to_pylist()
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in q}
    assert "unreadable .png" in reasons["broken.png"]
    assert "0 bytes" in reasons["empty.png"]
    assert reasons["notes.txt"] == "unsupported format '.txt'"
    assert "smaller than the 16px patch" in reasons["tiny.png"]
    # the table itself stays readable: _-prefixed files are not part of the dataset
    assert pads.dataset(out).count_rows() == summary.patches


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="produced no patches.*x.png"):
        ingest(str(tmp_path / "s"), str(tmp_path / "o"), IngestConfig(patch_size=16))
    with pytest.raises(InputError, match="does not exist"):
        ingest(str(tmp_path / "missing"), str(tmp_path / "o"), IngestConfig(patch_size=16))


# ---- formats, windows, masking (issue: scan archives) ----


def _pixels(out, patch_id, spec):
    table = pads.dataset(out).to_table(filter=pads.field("patch_id") == patch_id)
    assert table.num_rows == 1, patch_id
    pixels, reasons = decode_patches(table, spec)
    assert reasons == [None]
    return pixels[0]


def test_tiff_pages_and_npy_volume_slices(tmp_path):
    import tifffile

    rng = np.random.default_rng(1)
    src = tmp_path / "scans"
    src.mkdir()
    pages = rng.integers(0, 65535, (3, 20, 24)).astype(np.uint16)  # 3 pages, 16-bit
    tifffile.imwrite(src / "stack.tif", pages, photometric="minisblack")
    rgb = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    tifffile.imwrite(src / "rgb.tiff", rgb, photometric="rgb")
    volume = rng.random((16, 5, 32)).astype(np.float32)  # slices along axis 1
    np.save(src / "vol.npy", volume)
    out = tmp_path / "patches"
    s = ingest(str(src), str(out), IngestConfig(patch_size=16, slice_axis=1))
    # stack: 3 pages x (2 x 2); rgb: 1; vol: 5 slices of 16x32 -> 2 patches each. The stack
    # and the volume are one scan each, their pages and slices its `slice`
    assert (s.scans, s.patches, s.quarantined) == (3, 12 + 1 + 10, 0)
    page2 = _pixels(out, "stack@0002#16x16+8+4", PatchSpec(16, 1, "uint16"))
    rows = pads.dataset(out).to_table(columns=["patch_id", "scan_id", "slice"]).to_pylist()
    where = {r["patch_id"]: (r["scan_id"], r["slice"]) for r in rows}
    assert where["stack@0002#16x16+8+4"] == ("stack", 2)
    assert where["vol@0003#16x16+16+0"] == ("vol", 3) and where["rgb#16x16+0+0"] == ("rgb", None)
    np.testing.assert_array_equal(page2[:, :, 0], pages[2, 4:20, 8:24])  # 16 bits kept
    np.testing.assert_array_equal(_pixels(out, "rgb#16x16+0+0", PatchSpec(16, 3, "uint8")), rgb)
    sl = _pixels(out, "vol@0003#16x16+16+0", PatchSpec(16, 1, "float32"))
    np.testing.assert_array_equal(sl[:, :, 0], volume[:, 3, 16:32])
    assert {json_key(n) for n in s.normalisation} == {"uint16", "uint8", "float32"}


def json_key(norm: dict) -> str:
    return norm["dtype"] + ("" if norm["window"] is None else f"@{norm['window']}")


def test_dicom_rescale_window_and_bad_dicoms(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    stored = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 4096
    write_dicom(src / "ct.dcm", stored, slope=1.0, intercept=-1024.0)
    write_dicom(src / "nopixels.dcm", stored, pixel_data=False)
    (src / "garbage.dcm").write_bytes(b"DICM but not really" * 10)
    out = tmp_path / "patches"
    s = ingest(str(src), str(out), IngestConfig(patch_size=16, window=(40.0, 400.0)))
    assert (s.scans, s.patches, s.quarantined) == (1, 4, 2)
    rows = pq.read_table(out / "_quarantine.parquet").to_pylist()
    q = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in rows}
    assert "no pixel data" in q["nopixels.dcm"]
    assert "unreadable .dcm" in q["garbage.dcm"]
    got = _pixels(out, "ct#16x16+16+16", PatchSpec(16, 1, "uint16"))[:, :, 0]
    hu = stored[16:32, 16:32].astype(np.float64) - 1024.0  # rescale applied first
    want = np.rint(np.clip((hu - (40 - 200)) / 400, 0, 1) * 65535)
    np.testing.assert_array_equal(got, want)
    assert s.normalisation == [{"dtype": "uint16", "window": [40.0, 400.0]}]

    # without --window: the stored 12-bit range after rescale is the window
    s2 = ingest(str(src), str(tmp_path / "p2"), IngestConfig(patch_size=16))
    assert s2.normalisation == [{"dtype": "uint16", "window": [1023.5, 4095.0]}]
    raw = _pixels(tmp_path / "p2", "ct#16x16+0+0", PatchSpec(16, 1, "uint16"))[:, :, 0]
    np.testing.assert_array_equal(raw, np.rint(stored[:16, :16] / 4095 * 65535))


def test_signed_npy_needs_a_window(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    np.save(src / "hu.npy", np.full((16, 16), -500, np.int16))
    with pytest.raises(InputError, match="pass --window"):
        ingest(str(src), str(tmp_path / "p"), IngestConfig(patch_size=16))
    s = ingest(str(src), str(tmp_path / "p"), IngestConfig(patch_size=16, window=(-500, 100)))
    assert s.patches == 1


def test_min_foreground_skips_background_patches(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    img = np.zeros((64, 64), np.uint8)
    img[8:40, 8:40] = 200  # a bright object covering parts of 4 of the 16 patches
    Image.fromarray(img).save(src / "a.png")
    out = tmp_path / "p"
    s = ingest(str(src), str(out), IngestConfig(patch_size=16, min_foreground=0.25))
    ids = set(pads.dataset(out).to_table(columns=["patch_id"]).column(0).to_pylist())
    # patches (16,16) fully inside; (0,0),(32,0),(0,32),(32,32) hold 64/256 = 0.25 foreground
    assert "a#16x16+16+16" in ids and "a#16x16+48+48" not in ids
    assert s.patches == len(ids) == 9 and s.skipped_patches == 7
    scans = pq.read_table(out / "_scans.parquet").to_pylist()
    assert (scans[0]["height"], scans[0]["n_patches"], scans[0]["n_skipped"]) == (64, 9, 7)


def test_ray_engine_gives_the_same_table(scans, tmp_path, ray_local):
    root, _ = scans
    local = ingest(str(root), str(tmp_path / "a"), IngestConfig(patch_size=16, engine="local"))
    on_ray = ingest(str(root), str(tmp_path / "b"), IngestConfig(patch_size=16, engine="ray"))
    assert on_ray.engine == "ray" and on_ray.patches == local.patches
    ta = pads.dataset(tmp_path / "a").to_table().sort_by("patch_id")
    tb = pads.dataset(tmp_path / "b").to_table().sort_by("patch_id")
    assert ta.equals(tb)


def test_reingest_replaces_and_foreign_folders_are_refused(scans, tmp_path):
    root, _ = scans
    out = tmp_path / "p"
    ingest(str(root), str(out), IngestConfig(patch_size=16))
    ingest(str(root), str(out), IngestConfig(patch_size=32))  # replaces, no stale parts
    assert {r for r in pads.dataset(out).to_table().column("height").to_pylist()} == {32}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        ingest(str(root), str(tmp_path / "mine"), IngestConfig(patch_size=16))


def he_slide(h: int = 600, w: int = 700, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A brightfield-like RGB slide: near-white glass, two separate stained tissue regions
    (eosin pink and haematoxylin purple, the second darker). -> (image, tissue mask)."""
    rng = np.random.default_rng(seed)
    img = (np.full((h, w, 3), 236) + rng.integers(0, 10, (h, w, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    pink = (yy - 150) ** 2 + (xx - 170) ** 2 < 100**2
    purple = (yy - 430) ** 2 + (xx - 520) ** 2 < 120**2
    for region, colour in ((pink, (205, 120, 175)), (purple, (115, 75, 150))):
        noise = rng.integers(-20, 20, (int(region.sum()), 3))
        img[region] = np.clip(np.array(colour) + noise, 0, 255)
    return img, pink | purple


def test_colour_slides_are_masked_by_saturation_keeping_every_tissue_region():
    from anogan_batch.ingest.masks import foreground_mask

    img, tissue = he_slide()
    mask = foreground_mask(img)
    assert mask.shape == tissue.shape
    assert mask[tissue].mean() > 0.97  # both regions, the dark purple one too
    assert mask[~tissue].mean() < 0.02  # bright glass is background, not foreground
    # all glass: nothing; all tissue (no glass for Otsu to split off): everything
    assert foreground_mask(he_slide()[0][:80, -80:]).mean() < 0.01
    assert foreground_mask(img[100:200, 120:220]).mean() > 0.97


def test_large_scans_are_masked_on_a_strided_copy():
    from anogan_batch.ingest.masks import _intensity_mask, foreground_mask

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:1100, :1000]
    gray = np.where((yy - 500) ** 2 + (xx - 480) ** 2 < 300**2, 180, 30)
    gray = (gray + rng.integers(0, 20, gray.shape)).astype(np.uint8)
    mask = foreground_mask(gray[..., None])  # computed at stride 2
    assert mask.shape == (1100, 1000)
    assert (mask == _intensity_mask(gray / 255.0)).mean() > 0.99


def test_min_foreground_keeps_the_tissue_patches_of_a_colour_slide(tmp_path):
    img, tissue = he_slide()
    src = tmp_path / "slides"
    src.mkdir()
    Image.fromarray(img).save(src / "s.png")
    out = tmp_path / "p"
    s = ingest(str(src), str(out), IngestConfig(patch_size=50, min_foreground=0.5))
    t = pads.dataset(out).to_table(columns=["x", "y"]).to_pylist()
    assert s.patches == len(t) > 20 and s.skipped_patches > 100
    for r in t:  # each kept patch is mostly tissue
        assert tissue[r["y"] : r["y"] + 50, r["x"] : r["x"] + 50].mean() >= 0.4


def test_specks_on_the_glass_are_not_foreground():
    """Dust and pen dots (3 x 3 pixels of saturation on glass: the median filter keeps their
    centre cross) are dropped by the mask's opening; tissue regions stay whole."""
    from anogan_batch.ingest.masks import foreground_mask

    img, tissue = he_slide()
    rng = np.random.default_rng(3)
    glass = np.argwhere(~tissue[2:-2, 2:-2]) + 2
    for y, x in glass[rng.choice(len(glass), 40, replace=False)]:
        if not tissue[y - 2 : y + 3, x - 2 : x + 3].any():
            img[y - 1 : y + 2, x - 1 : x + 2] = (150, 40, 160)
    from anogan_batch.ingest.masks import _erode

    mask = foreground_mask(img)
    far = ~tissue  # the glass, away from the tissue's edge
    for _ in range(4):
        far = _erode(far)
    assert not (mask & far).any()  # the specks are gone (195 mask pixels without the opening)
    assert (mask & tissue).sum() >= 0.97 * tissue.sum()  # the tissue is not


@pytest.mark.parametrize("kind", ["png", "dicom series"])
def test_s3_past_its_retries_is_raised_never_quarantined(kind, tmp_path, monkeypatch):
    """A scan file whose bytes S3 cannot deliver after the retry policy is the storage's
    fault, not the file's: ingest raises (exit 1; a rerun redoes it), and no scan is
    quarantined as "unreadable"."""
    from anogan_batch.job import ingest as ingest_job
    from tests.volumes import write_series

    src = tmp_path / "src"
    if kind == "png":
        src.mkdir()
        Image.fromarray(np.full((32, 32), 200, np.uint8)).save(src / "a.png")
    else:
        write_series(src, 4, scout=False)

    def unreachable(f, limit):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: refused")

    monkeypatch.setattr(ingest_job, "read_file", unreachable)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        ingest(str(src), str(tmp_path / "out"), IngestConfig(16, engine="local"))
