"""The Ray Data job in process on a real local Ray: outputs, invariance, quarantine, reruns."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from anogan_batch.core.model import model_input
from anogan_batch.core.search import latent_search
from anogan_batch.core.search_config import POLISH, SearchConfig
from anogan_batch.errors import ConfigError, InputError
from anogan_batch.io.patches import decode_map
from anogan_batch.job.runner import run_score_job
from anogan_batch.job.score_config import ScoreJobConfig
from tests.conftest import make_patch_table

SEARCH = SearchConfig(iterations=10, seed=5)
THRESHOLD = 450.0


def scores_of(out) -> pa.Table:
    return pads.dataset(out / "patch_scores", partitioning="hive").to_table().sort_by("patch_id")


@pytest.fixture(scope="module")
def finished_job(ray_local, tiny_model, test_table, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "out"
    # ~20 rows per file (one row is about 3.5 kB): 60 rows must not become 9 one-batch files
    cfg = ScoreJobConfig(
        tiny_model,
        test_table,
        str(out),
        search=SEARCH,
        batch_size=7,
        target_file_mb=0.067,
        threshold=THRESHOLD,
        progress=False,
    )
    return run_score_job(cfg), out


def test_every_row_scored_with_contract_columns(finished_job):
    manifest, out = finished_job
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded"
    assert job["input_rows"] == job["scored_rows"] == 60 and job["quarantined_rows"] == 0
    assert job["patches_per_second"] > 0
    for key in ("job_id", "model_id", "params", "started_at", "finished_at"):
        assert job[key]
    table = scores_of(out)
    assert table.num_rows == 60 and len(set(table.column("patch_id").to_pylist())) == 60
    types = {f.name: f.type for f in table.schema}
    for col in ("anomaly_score", "residual_score", "discrimination_score"):
        assert types[col] == pa.float64()
    assert types["x"] == types["y"] == pa.int32()
    assert set(table.column("job_id").to_pylist()) == {manifest.job_id}
    assert set(table.column("model_id").to_pylist()) == {manifest.model_id}
    assert sorted(p.name for p in (out / "patch_scores").iterdir()) == [f"job_id={manifest.job_id}"]
    assert not (out / "_checkpoint").exists()


def test_job_scores_equal_in_process_scores(finished_job, loaded_tiny, sample):
    """Batch size 7 on Ray actors == one in-process batch of 60: no batch or order effects."""
    _, out = finished_job
    table = scores_of(out)
    idx = {f"digits/{i:05d}#28x28+0+0": k for k, i in enumerate(sample["test_index"][:60])}
    order = [idx[p] for p in table.column("patch_id").to_pylist()]
    pixels = torch.from_numpy(sample["test_images"][order][..., None].copy())
    x = model_input(pixels, loaded_tiny.config)
    ref = latent_search(
        loaded_tiny.generator,
        loaded_tiny.discriminator,
        x,
        table.column("patch_id").to_pylist(),
        SEARCH,
        loaded_tiny.encoder,
    )
    np.testing.assert_allclose(
        table.column("anomaly_score").to_numpy(), ref.anomaly_score, rtol=1e-5
    )
    # the model has an encoder, so "auto" searched from E(x); job.json says so
    params = json.loads((out / "job.json").read_text())["params"]
    assert (params["start"], params["iterations"], params["lr"]) == ("encoder", 10, POLISH[1])
    # compact maps (float16, the default): each value within 2^-11 of float32's, so the sum too
    raw = table.column("residual_map").to_pylist()
    assert {len(b) for b in raw} == {28 * 28 * 2}
    maps = np.stack([decode_map(b, 28, 28, 1).ravel() for b in raw])
    np.testing.assert_allclose(maps.sum(1), table.column("residual_score").to_numpy(), rtol=2**-11)


def test_scan_scores_aggregate_patch_scores(finished_job):
    _, out = finished_job
    patches = scores_of(out).to_pandas()
    scans = pads.dataset(out / "scan_scores").to_table().to_pandas().set_index("scan_id")
    expected = patches.groupby("scan_id")["anomaly_score"].agg(["count", "max", "mean"])
    assert len(scans) == len(expected)
    np.testing.assert_array_equal(scans.loc[expected.index, "n_patches"], expected["count"])
    np.testing.assert_allclose(scans.loc[expected.index, "max_score"], expected["max"])
    np.testing.assert_allclose(scans.loc[expected.index, "mean_score"], expected["mean"])
    p95 = patches.groupby("scan_id")["anomaly_score"].quantile(0.95)
    np.testing.assert_allclose(scans.loc[p95.index, "p95_score"], p95)
    above = (patches["anomaly_score"] > THRESHOLD).groupby(patches["scan_id"]).sum()
    np.testing.assert_array_equal(scans.loc[above.index, "n_above_threshold"], above)
    top = patches.loc[patches.groupby("scan_id")["anomaly_score"].idxmax()].set_index("scan_id")
    assert (scans.loc[top.index, "max_patch_id"] == top["patch_id"]).all()


def test_output_files_follow_the_target_size(finished_job):
    import pyarrow.parquet as pq

    _, out = finished_job
    sizes = [pq.read_metadata(f).num_rows for f in (out / "patch_scores").rglob("*.parquet")]
    assert sum(sizes) == 60
    assert 2 <= len(sizes) <= 4, sizes
    assert sorted(sizes)[1] >= 20, sizes  # every file but the last reaches the target


def test_output_files_hold_few_large_row_groups(finished_job):
    """A file's rows are scored in many small batches; stored one row group per batch, a
    10 M-row job's footers (every reader plans from them) grew the driver by hundreds of MB."""
    import pyarrow.parquet as pq

    _, out = finished_job
    for f in (out / "patch_scores").rglob("*.parquet"):
        meta = pq.read_metadata(f)
        assert meta.num_row_groups == 1, (f.name, meta.num_rows, meta.num_row_groups)


def test_duckdb_reads_the_warehouse_tables(finished_job):
    import duckdb

    manifest, out = finished_job
    con = duckdb.connect()
    n, distinct, jobs = con.execute(
        f"SELECT count(*), count(DISTINCT patch_id), list(DISTINCT job_id) "
        f"FROM read_parquet('{out}/patch_scores/**/*.parquet', hive_partitioning = true)"
    ).fetchall()[0]
    assert (n, distinct, jobs) == (60, 60, [manifest.job_id])
    # the README's query
    rows = con.execute(
        f"SELECT scan_id, max_score, mean_score, n_patches "
        f"FROM read_parquet('{out}/scan_scores/*.parquet') ORDER BY max_score DESC LIMIT 10"
    ).fetchall()
    assert len(rows) == 10 and rows[0][1] >= rows[-1][1]


def test_readme_duckdb_queries_run(finished_job):
    """Every SQL block of the README runs against a real job's output."""
    import re
    from pathlib import Path

    import duckdb

    _, out = finished_job
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    queries = [q.strip() for b in blocks for q in b.split(";") if q.strip()]
    assert len(queries) >= 3
    con = duckdb.connect()
    for query in queries:
        rows = con.execute(query.replace("'job/", f"'{out}/")).fetchall()
        assert rows, query
    worst = con.execute(queries[-1].replace("'job/", f"'{out}/")).fetchall()[0]
    top = pads.dataset(out / "scan_scores").to_table().sort_by([("max_score", "descending")])
    assert worst[0] == top.column("scan_id")[0].as_py()


def test_rerun_of_a_finished_job_scores_nothing(finished_job, tiny_model, test_table):
    manifest, out = finished_job
    cfg = ScoreJobConfig(tiny_model, test_table, str(out), search=SEARCH, progress=False)
    again = run_score_job(cfg)
    assert again.job_id == manifest.job_id and again.status == "succeeded"
    assert scores_of(out).num_rows == 60


def test_rerun_with_other_parameters_is_refused(finished_job, tiny_model, test_table):
    _, out = finished_job
    cfg = ScoreJobConfig(
        tiny_model, test_table, str(out), search=SearchConfig(iterations=11), progress=False
    )
    with pytest.raises(InputError, match="iterations=10.*iterations=11"):
        run_score_job(cfg)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory, sample):
    from anogan_batch.core.model_config import TrainConfig
    from anogan_batch.core.training import train_gan

    root = tmp_path_factory.mktemp("float")
    pixels = sample["train_images"][:256].astype(np.float32) / 255.0
    table = make_patch_table(root / "train", pixels)
    train_gan(
        str(table),
        str(root / "model"),
        TrainConfig(epochs=1, g_width=4, d_width=4, latent_dim=8),
        progress=False,
    )
    return str(root / "model")


def test_bad_rows_are_quarantined_and_the_job_completes(ray_local, float_model, sample, tmp_path):
    pixels = sample["test_images"][:20].astype(np.float32)[..., None] / 255.0
    pixels[3, 5, 5] = np.nan
    pixels[7, 0, 0] = np.inf
    table = make_patch_table(tmp_path / "p", pixels, [str(v) for v in sample["test_labels"][:20]])
    out = tmp_path / "out"
    m = run_score_job(
        ScoreJobConfig(
            float_model, str(table), str(out), search=SEARCH, batch_size=6, progress=False
        )
    )
    assert (m.status, m.input_rows, m.scored_rows, m.quarantined_rows) == ("succeeded", 20, 18, 2)
    q = pads.dataset(out / "quarantine").to_table().sort_by("patch_id").to_pylist()
    assert [r["reason"] for r in q] == ["image has 1 NaN/inf pixels"] * 2
    assert {r["patch_id"] for r in q} == {"scan00003#28x28+0+0", "scan00007#28x28+0+0"}
    scored = set(scores_of(out).column("patch_id").to_pylist())
    assert not scored & {r["patch_id"] for r in q}


def test_table_normalised_unlike_the_model_is_refused(tiny_model, sample, tmp_path):
    """A model trained on 8-bit scans must not score windowed 16-bit CT patches (exit 2)."""
    import shutil

    from PIL import Image

    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig

    src = tmp_path / "scans"
    src.mkdir()
    for i in range(3):
        Image.fromarray(sample["test_images"][i]).save(src / f"{i}.png")
    ingest(str(src), str(tmp_path / "ok"), IngestConfig(patch_size=28))
    ingest(str(src), str(tmp_path / "ct"), IngestConfig(patch_size=28, window=(100.0, 50.0)))
    # same weights, but the model card says it was trained on windowed 8-bit scans
    windowed = tmp_path / "windowed_model"
    shutil.copytree(tiny_model, windowed)
    doc = json.loads((windowed / "model.json").read_text())
    doc["normalisation"]["window"] = [100.0, 50.0]
    (windowed / "model.json").write_text(json.dumps(doc))

    def job(model, table):
        out = str(tmp_path / f"out-{table}")
        return ScoreJobConfig(str(model), str(tmp_path / table), out, search=SEARCH)

    from anogan_batch.job.runner import prepare

    assert prepare(job(tiny_model, "ok"))[1] == 3
    with pytest.raises(InputError, match="normalised as .*uint16.*trained on .*uint8"):
        prepare(job(tiny_model, "ct"))
    with pytest.raises(InputError, match=r"window': None.*window': \[100.0, 50.0\]"):
        prepare(job(windowed, "ok"))


def _node(cpus: float, memory_gib: float | None = 64.0, gpus: float = 0.0) -> dict:
    res: dict[str, float] = {"CPU": cpus}
    if memory_gib is not None:
        res["memory"] = memory_gib * 2**30
    if gpus:
        res["GPU"] = gpus
    return {"Resources": res}


def _plan(nodes: list[dict], todo_rows: int | None = None, **kw):
    from anogan_batch.job.pipeline import plan_resources

    cfg = ScoreJobConfig("m", "p", "o", **kw)
    cluster = {"GPU": sum(n["Resources"].get("GPU", 0.0) for n in nodes)}
    return plan_resources(cfg, {k: v for k, v in cluster.items() if v}, nodes, todo_rows)


@pytest.mark.parametrize(
    ("nodes", "actors", "threads"),
    [
        # the local cluster on 2 cores advertises 4 CPUs: two 1-thread actors, 2 CPUs for I/O
        ([_node(4, 16)], 2, 1),
        # every core but two per node, one thread each; a CPU-less head node scores nothing
        ([_node(0), _node(16), _node(16)], 28, 1),
        # a 2-core node still gets one actor
        ([_node(2)], 1, 1),
        # 62 actors would not fit in 16 GiB: 4 threads each, 15 actors (15 GiB)
        ([_node(64, 16)], 15, 4),
        # no memory figure from Ray: sized by cores alone
        ([_node(8, None)], 6, 1),
    ],
)
def test_cpu_actors_fill_every_core_but_the_io_reserve(nodes, actors, threads):
    res = _plan(nodes)
    assert (res.min_actors, res.max_actors) == (actors, actors)
    assert res.threads == threads and res.cpus_per_actor == threads and res.gpus_per_actor == 0
    # the pool fits: every node holds its actors beside the reserve
    held = sum(
        max(1, int(max(0, n["Resources"]["CPU"] - 2) // threads))
        for n in nodes
        if n["Resources"]["CPU"] >= 1
    )
    assert held == actors


def test_explicit_actor_and_gpu_flags_win():
    res = _plan([_node(8)], actors=(3, 3))
    assert (res.max_actors, res.cpus_per_actor, res.threads) == (3, 2.0, 2)
    # a CPU-less head node neither takes a share of the actors nor shrinks their cores
    res = _plan([_node(0), _node(8), _node(8)], actors=(4, 4))
    assert (res.max_actors, res.threads) == (4, 3)
    res = _plan([_node(8)], cpus_per_actor=3.0)
    assert (res.max_actors, res.threads) == (2, 3)
    res = _plan([_node(8, gpus=4)])
    assert (res.max_actors, res.gpus_per_actor, res.cpus_per_actor) == (4, 1.0, 1.0)
    res = _plan([_node(8, gpus=4)], gpus_per_actor=0.5)
    assert res.max_actors == 8
    with pytest.raises(InputError, match="gpus-per-actor"):
        _plan([_node(8, gpus=1)], gpus_per_actor=2.0)


def test_the_device_decides_whether_actors_take_gpus():
    # --device cpu on a GPU cluster: CPU actors, no GPU asked for
    res = _plan([_node(8, gpus=4)], device="cpu")
    assert (res.gpus_per_actor, res.max_actors) == (0.0, 6)
    # --device cuda: a GPU an actor, and none in the cluster is an error (after the wait)
    assert _plan([_node(8, gpus=2)], device="cuda").gpus_per_actor == 1.0
    with pytest.raises(InputError, match="0 GPUs"):
        _plan([_node(8)], device="cuda")
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        ScoreJobConfig("m", "p", "o", device="cpu", gpus_per_actor=1.0)
    with pytest.raises(ConfigError, match="'device'"):
        ScoreJobConfig("m", "p", "o", device="gpu")


def test_the_pool_never_outnumbers_the_batches():
    # 28 cores' worth of actors, 3 batches to score (130 rows at 64): 3 actors, same threads
    res = _plan([_node(16), _node(16)], todo_rows=130)
    assert (res.min_actors, res.max_actors, res.threads) == (3, 3, 1)
    res = _plan([_node(16)], todo_rows=130, actors=(2, 8))
    assert (res.min_actors, res.max_actors) == (2, 3)
    assert _plan([_node(16)], todo_rows=0).max_actors == 1  # a resumed, finished job
