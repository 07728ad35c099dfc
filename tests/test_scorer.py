"""job/scorer.py in process: a row is quarantined only for a reason of its own data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anogan_batch.core import devices
from anogan_batch.core import search as search_module
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.io.patches import patch_id_for
from anogan_batch.io.tables import patch_table
from anogan_batch.job.scorer import score_table

SEARCH = SearchConfig(iterations=3, seed=1)


@pytest.fixture(scope="module")
def model(tiny_model):
    from anogan_batch.core.modeldir import load_model

    return load_model(tiny_model).for_scoring("cpu")  # its own copy: scoring-ready in place


@pytest.fixture(scope="module")
def rows(sample):
    ids = [patch_id_for(f"s{i}", 0, 0, 28) for i in range(12)]
    return patch_table(sample["test_images"][:12][..., None], ids=ids)


@pytest.fixture(scope="module")
def reference(model, rows):
    return score_table(model, rows, SEARCH, job_id="j", device="cpu")


@pytest.fixture
def faults(monkeypatch):
    def set_faults(spec: str) -> None:
        monkeypatch.setenv(devices.FAULTS_ENV, spec)
        devices._faults.cache_clear()

    yield set_faults
    monkeypatch.delenv(devices.FAULTS_ENV, raising=False)
    devices._faults.cache_clear()
    devices._poisoned.clear()


def test_out_of_memory_splits_the_batch_and_changes_no_score(model, rows, reference, faults):
    faults("oom=1")  # every search of two or more patches runs out of memory
    calls = []
    real = search_module.latent_search

    def counting(g, d, x, ids, cfg, encoder=None):
        calls.append(len(ids))
        return real(g, d, x, ids, cfg, encoder)

    search_module.latent_search, saved = counting, real
    try:
        out = score_table(model, rows, SEARCH, job_id="j", device="cpu")
    finally:
        search_module.latent_search = saved
    assert calls == [1] * 12  # halved down to one patch a search
    assert out.column("reason").null_count == 12  # nothing quarantined
    np.testing.assert_allclose(
        out.column("anomaly_score").to_numpy(), reference.column("anomaly_score").to_numpy(),
        rtol=1e-5,
    )  # fmt: skip


def test_a_failing_search_quarantines_only_the_rows_that_fail_alone(
    model, rows, reference, monkeypatch
):
    real = search_module.latent_search
    bad = rows.column("patch_id")[5].as_py()

    def poisoned(g, d, x, ids, cfg, encoder=None):
        if bad in ids:
            raise RuntimeError("injected fault")
        return real(g, d, x, ids, cfg, encoder)

    monkeypatch.setattr(search_module, "latent_search", poisoned)
    out = score_table(model, rows, SEARCH, job_id="j", device="cpu")
    reasons = out.column("reason").to_pylist()
    assert [i for i, r in enumerate(reasons) if r] == [5]
    assert reasons[5] == "scoring failed: RuntimeError: injected fault"
    ok = [i for i in range(12) if i != 5]
    np.testing.assert_allclose(
        out.column("anomaly_score").to_numpy()[ok],
        reference.column("anomaly_score").to_numpy()[ok],
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        torch.OutOfMemoryError("CUDA out of memory"),  # even one patch does not fit
    ],
)
def test_a_fault_of_the_device_is_raised_never_quarantined(model, rows, monkeypatch, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(search_module, "latent_search", failing)
    with pytest.raises(type(error)):
        score_table(model, rows, SEARCH, job_id="j", device="cpu")


def test_an_actor_learns_how_many_patches_its_device_holds(model, rows, reference, faults):
    from anogan_batch.core.scoring import SearchLimit

    faults("oom_above=4")  # a device that holds 4 patches a search
    limit = SearchLimit()
    first = score_table(model, rows, SEARCH, job_id="j", device="cpu", limit=limit)
    assert limit.rows == 3  # 12 -> 6 -> 3: the sizes that were tried and fit
    calls = []
    real = search_module.latent_search

    def counting(g, d, x, ids, cfg, encoder=None):
        calls.append(len(ids))
        return real(g, d, x, ids, cfg, encoder)

    search_module.latent_search = counting
    try:
        again = score_table(model, rows, SEARCH, job_id="j", device="cpu", limit=limit)
    finally:
        search_module.latent_search = real
    assert calls == [3, 3, 3, 3]  # the next batch is cut to the limit: no error to learn from
    for out in (first, again):
        assert out.column("reason").null_count == 12
        np.testing.assert_allclose(
            out.column("anomaly_score").to_numpy(),
            reference.column("anomaly_score").to_numpy(),
            rtol=1e-5,
        )


def test_compact_maps_halve_the_map_bytes_and_none_drops_them(model, rows, reference):
    compact = score_table(model, rows, SEARCH, job_id="j", device="cpu", encoding="compact")
    none = score_table(model, rows, SEARCH, job_id="j", device="cpu", encoding="none")
    full = reference.column("residual_map").to_pylist()
    assert [len(b) for b in compact.column("residual_map").to_pylist()] == [
        len(b) // 2 for b in full
    ]
    assert none.column("residual_map").null_count == 12
    assert none.column("reason").null_count == 12  # scored all the same
    np.testing.assert_array_equal(
        none.column("anomaly_score").to_numpy(), compact.column("anomaly_score").to_numpy()
    )


def test_batches_on_two_threads_overlap_host_work_with_one_search_at_a_time(
    model, rows, reference, monkeypatch
):
    """An actor runs two calls at once (job/pipeline): its device thread searches one batch at
    a time, while the other call decodes its rows; the rows are those of a serial call."""
    import threading
    import time

    from anogan_batch.io import patches as patches_module
    from anogan_batch.job.scorer import DeviceThread

    events: list[tuple[str, float, float]] = []  # (what, start, end)
    searching: list[int] = []
    threads: set[int] = set()
    started = threading.Event()
    real_search, real_decode = search_module.latent_search, patches_module.decode_patches

    def slow_search(g, d, x, ids, cfg, encoder=None):
        searching.append(1)
        threads.add(threading.get_ident())
        assert len(searching) == 1, "two searches on the device at once"
        start = time.perf_counter()
        started.set()
        time.sleep(0.4)
        try:
            return real_search(g, d, x, ids, cfg, encoder)
        finally:
            searching.pop()
            events.append(("search", start, time.perf_counter()))

    def timed_decode(table, spec):
        start = time.perf_counter()
        out = real_decode(table, spec)
        events.append(("decode", start, time.perf_counter()))
        return out

    monkeypatch.setattr(search_module, "latent_search", slow_search)
    monkeypatch.setattr(patches_module, "decode_patches", timed_decode)
    searcher = DeviceThread()
    halves = [rows.slice(0, 6), rows.slice(6, 6)]
    outs: dict[int, object] = {}

    def call(i: int) -> None:
        outs[i] = score_table(model, halves[i], SEARCH, job_id="j", device="cpu",
                              searcher=searcher)  # fmt: skip

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=call, args=(1,))
    second.start()
    first.join()
    second.join()
    (s0, e0), (s1, _) = sorted((s, e) for w, s, e in events if w == "search")
    decoded = sorted((s, e) for w, s, e in events if w == "decode")[1]  # the second call's
    assert s0 < decoded[0] and decoded[1] < e0, "the second call's decode waited on the search"
    assert e0 <= s1  # one search at a time
    assert len(threads) == 1 and threading.get_ident() not in threads  # on the device thread
    assert searcher.take_busy() >= 2 * 0.4  # the device's busy time: the searches
    assert searcher.take_busy() == 0.0
    expected = reference.column("anomaly_score").to_numpy()
    for i in range(2):
        got = outs[i].column("anomaly_score").to_numpy()
        np.testing.assert_allclose(got, expected[i * 6 : i * 6 + 6], rtol=1e-5)
