"""`anogan-batch demo`: the whole flow on MNIST scans that ship with the package.

The archive: 24 "scans", each a 4 x 4 mosaic (112 x 112 px) of real handwritten zeros, the
normal tissue. Twelve of them carry one or two lesions: tiles replaced by other digits. The
bundled sample (data/mnist_sample.npz, made by scripts/make_demo_sample.py) holds those digits,
all held out from the 4,000 training zeros. The bundled model (data/model/) was trained by this
project's own `train` command: see scripts/train_demo_model.sh for the exact command.

    mosaic PNG scans -> ingest -> [train] -> score on local Ray -> heatmaps -> eval -> report

It reports patch-level AUROC (lesion tiles against normal tiles, from the truth file the demo
writes next to the scans) and scan-level AUROC (lesion scans against normal scans, by each
scan's highest patch score), and writes heatmap overlays that light up at the lesions.
"""

from __future__ import annotations

import time
from importlib import resources

import numpy as np

from anogan_batch.io import storage
from anogan_batch.io.columns import FLAGGED, HEIGHT, PATCH_ID, SCAN_ID, WIDTH, X, Y

NORMAL_LABEL = "0"  # the digit the model was trained on
PATCH_SIZE = 28
GRID = 4  # tiles per side of a mosaic scan
N_NORMAL_SCANS, N_LESION_SCANS = 12, 12
# The recipe of the bundled model (also what `demo --train` runs): train's defaults, except
# what is listed here. Pixels as stored: on zeros, contrast normalisation ranks thin normal
# zeros as anomalous, and the blur leaves too few lesion scans past the calibration's tail to
# flag any at the demo's FDR (docs/quality.md, "The demo's model"); f = D's last block, the
# layer the bundled model was measured with.
TRAIN_ARGS = {
    "input_norm": "none",
    "input_blur": 0.0,
    "feature_layer": -1,
    # all 4,000 zeros train: the calibration is the sample's own held-out zeros (below)
    "calibration_fraction": 0.0,
}
# The demo's decisions: patches flagged at p <= FPR, scans by Benjamini-Hochberg at FDR
DEMO_FPR, DEMO_FDR = 0.01, 0.1


def data_path(*parts: str) -> str:
    return str(resources.files("anogan_batch").joinpath("data", *parts))


def bundled_model_dir() -> str:
    return data_path("model")


def load_sample() -> dict[str, np.ndarray]:
    with np.load(data_path("mnist_sample.npz")) as f:
        return {k: f[k] for k in f.files}


def write_sample_scans(scans: str, *, split: str) -> int:
    """Write the sample's `split` ('train', 'test' or 'calibration') digits as PNGs in one
    folder per digit."""
    from anogan_batch.io.plots import png_bytes

    sample = load_sample()
    images, labels, index = (sample[f"{split}_{k}"] for k in ("images", "labels", "index"))
    for img, label, idx in zip(images, labels, index, strict=True):
        storage.write_bytes(storage.join(scans, str(label), f"{idx:05d}.png"), png_bytes(img))
    return len(images)


def write_mosaic_scans(scans: str, truth: str, *, seed: int = 0) -> tuple[int, int]:
    """Write the mosaic archive (normal/ and lesion/ folders) and the patch truth CSV.

    -> (number of scans, number of lesion tiles). Deterministic for a seed.
    """
    from anogan_batch.io.patches import patch_id_for
    from anogan_batch.io.plots import png_bytes

    sample = load_sample()
    tiles, lesions = iter(sample["tile_images"]), iter(sample["lesion_images"])
    rng = np.random.default_rng(seed)
    rows = ["patch_id,label"]
    n_lesions = 0
    for k in range(N_NORMAL_SCANS + N_LESION_SCANS):
        folder = "normal" if k < N_NORMAL_SCANS else "lesion"
        sick = set()
        if folder == "lesion":
            sick = set(rng.choice(GRID * GRID, 1 + k % 2, replace=False).tolist())
        scan = np.zeros((GRID * PATCH_SIZE, GRID * PATCH_SIZE), dtype=np.uint8)
        scan_id = f"{folder}/scan_{k:02d}"
        for t in range(GRID * GRID):
            row, col = divmod(t, GRID)
            y, x = row * PATCH_SIZE, col * PATCH_SIZE
            scan[y : y + PATCH_SIZE, x : x + PATCH_SIZE] = next(lesions if t in sick else tiles)
            label = "lesion" if t in sick else "normal"
            rows.append(f"{patch_id_for(scan_id, x, y, PATCH_SIZE)},{label}")
        n_lesions += len(sick)
        storage.write_bytes(storage.join(scans, scan_id + ".png"), png_bytes(scan))
    storage.write_bytes(truth, ("\n".join(rows) + "\n").encode())
    return N_NORMAL_SCANS + N_LESION_SCANS, n_lesions


def run_demo(out: str, *, train: bool = False, iterations: int | None = None) -> dict:
    """Run the demo into `out` (its sub-folders are replaced) and print where things are."""
    from anogan_batch.core.calibrating import calibrate
    from anogan_batch.core.model_config import TrainConfig
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.core.training import train_gan
    from anogan_batch.evaluation.evaluate import evaluate_job
    from anogan_batch.evaluation.report import write_report
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    out = storage.absolute(out)
    subs = ("scans", "truth.csv", "patches", "train_scans", "train_patches", "calibration_scans",
            "calibration_patches", "model", "job")  # fmt: skip
    for sub in subs:
        storage.delete(storage.join(out, sub))
    started = time.time()
    say = print

    truth = storage.join(out, "truth.csv")
    n_scans, n_lesions = write_mosaic_scans(storage.join(out, "scans"), truth)
    say(
        f"[1/5] wrote {n_scans} mosaic scans ({GRID}x{GRID} digits: zeros are normal tissue, "
        f"{n_lesions} lesion tiles of other digits) to {out}/scans"
    )
    icfg = IngestConfig(patch_size=PATCH_SIZE, label_from_parent=True)
    ingest(storage.join(out, "scans"), storage.join(out, "patches"), icfg)

    if train:
        write_sample_scans(storage.join(out, "train_scans"), split="train")
        ingest(storage.join(out, "train_scans"), storage.join(out, "train_patches"), icfg)
        model_dir = storage.join(out, "model")
        say("[2/5] training the GAN on 4,000 normal digits ...")
        train_gan(
            storage.join(out, "train_patches"),
            model_dir,
            TrainConfig(normal_label=NORMAL_LABEL, **TRAIN_ARGS),
        )
        write_sample_scans(storage.join(out, "calibration_scans"), split="calibration")
        ingest(
            storage.join(out, "calibration_scans"), storage.join(out, "calibration_patches"), icfg
        )
        calibrate(model_dir, storage.join(out, "calibration_patches"), normal_label=NORMAL_LABEL)
    else:
        model_dir = bundled_model_dir()
        say(f"[2/5] using the bundled model in {model_dir} (retrain with --train)")

    n = n_scans * GRID * GRID
    how = "the search's default" if iterations is None else f"Γ = {iterations}"
    say(f"[3/5] scoring {n} patches on local Ray ({how}), then heatmaps ...")
    job = storage.join(out, "job")
    manifest = run_score_job(
        ScoreJobConfig(
            model_dir=model_dir,
            patches=storage.join(out, "patches"),
            out=job,
            search=SearchConfig(iterations=iterations),
            fpr=DEMO_FPR,
            fdr=DEMO_FDR,
        )
    )
    say("[4/5] evaluating against the lesion truth ...")
    metrics = evaluate_job(job, "normal", truth=truth)
    say("[5/5] writing the report ...")
    report = write_report(job)
    minutes = (time.time() - started) / 60
    say("")
    say(f"done in {minutes:.1f} min; {manifest.patches_per_second:.1f} patches/s")
    say(f"  patch scores : {job}/patch_scores/")
    say(f"  scan scores  : {job}/scan_scores/")
    say(f"  heatmaps     : {job}/heatmaps/ (one row per scan), overlays in {job}/overlays/")
    say(f"  job manifest : {job}/job.json")
    say(f"  report       : {report}")
    scan = metrics.get("scan", {})
    say(
        f"patch AUROC {metrics['auroc']:.4f}  AUPRC {metrics['auprc']:.4f}  "
        f"({metrics['n_normal']} normal, {metrics['n_anomalous']} lesion tiles)"
    )
    if scan:
        say(
            f"scan  AUROC {scan['auroc']:.4f}  AUPRC {scan['auprc']:.4f}  "
            f"({scan['n_normal']} normal, {scan['n_anomalous']} lesion scans)"
        )
    say(decisions_line(manifest.decisions or {}, job))
    shares = overlay_shares(job, truth)
    say(
        f"overlays: {100 * shares['coloured_in_lesion_tiles']:.1f} % of coloured pixels in "
        f"lesion tiles; normal scans {100 * shares['normal_scans_coloured']:.1f} % coloured"
    )
    return metrics | {"overlays": shares}


def overlay_shares(job: str, truth: str) -> dict[str, float]:
    """How a demo job's overlay PNGs colour, against the truth: the share of coloured pixels
    (the scan underneath is gray, so colour is where R, G, B differ) that lie in lesion tiles,
    and the share of normal scans' pixels that are coloured."""
    from PIL import Image

    from anogan_batch.io.tables import read_columns
    from anogan_batch.job.layout import JobLayout

    lesion = {
        line.split(",")[0]
        for line in storage.read_bytes(truth).decode().splitlines()[1:]
        if line.endswith(",lesion")
    }
    layout = JobLayout(job)
    patches = read_columns(layout.patch_scores, [PATCH_ID, SCAN_ID, X, Y]).to_pylist()
    tiles: dict[str, list[tuple[int, int]]] = {}
    for r in patches:
        if r[PATCH_ID] in lesion:
            tiles.setdefault(r[SCAN_ID], []).append((r[X], r[Y]))
    sizes = read_columns(layout.heatmaps, [SCAN_ID, HEIGHT, WIDTH]).to_pylist()
    in_lesions = coloured = normal_coloured = normal_pixels = 0
    for scan in sizes:
        rgb = np.asarray(Image.open(layout.overlay(scan[SCAN_ID])).convert("RGB"), np.int16)
        colour = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
        inside = np.zeros_like(colour)
        sy, sx = colour.shape[0] / scan[HEIGHT], colour.shape[1] / scan[WIDTH]
        for x, y in tiles.get(scan[SCAN_ID], []):
            rows = slice(round(y * sy), round((y + PATCH_SIZE) * sy))
            inside[rows, round(x * sx) : round((x + PATCH_SIZE) * sx)] = True
        coloured += int(colour.sum())
        in_lesions += int((colour & inside).sum())
        if scan[SCAN_ID].startswith("normal/"):
            normal_coloured += int(colour.sum())
            normal_pixels += colour.size
    return {
        "coloured_in_lesion_tiles": in_lesions / max(1, coloured),
        "normal_scans_coloured": normal_coloured / max(1, normal_pixels),
    }


def decisions_line(decisions: dict, job: str) -> str:
    """The demo's decisions against its truth (a scan is a lesion scan by its folder)."""
    if not decisions.get("p_values"):
        return f"decisions: no p-values ({decisions.get('why')})"
    from anogan_batch.io.tables import read_columns
    from anogan_batch.job.layout import JobLayout

    scans = read_columns(JobLayout(job).scan_scores, [SCAN_ID, FLAGGED]).to_pylist()
    flagged = [r[SCAN_ID] for r in scans if r[FLAGGED]]
    false = sum(not s.startswith("lesion/") for s in flagged)
    return (
        f"decisions: {decisions['patches_flagged']} patches flagged at p <= {DEMO_FPR}; "
        f"{len(flagged)} scans flagged at FDR {DEMO_FDR}, {false} of them normal"
    )


if __name__ == "__main__":  # used by scripts/train_demo_model.sh
    import sys

    write_sample_scans(sys.argv[1], split=sys.argv[2])
