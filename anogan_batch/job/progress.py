"""The live progress line of a scoring job, the scorers' telemetry (memory, busy time, the
device each one scores on) and the ledger of device faults per batch (job/scorer.py)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

MAX_ACTORS_RECORDED = 256  # job.json lists this many scorers at most (restarts add entries)


class Progress:
    """A Ray actor counts rows the scorers finished; a driver thread prints rate and ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        import ray

        @ray.remote(num_cpus=0)
        class Counter:
            def __init__(self) -> None:
                self.n = 0
                self.busy = 0.0  # seconds the scorers spent inside their batches
                self.peak_rss: dict[int, float] = {}  # scorer pid -> peak RSS (MiB)
                self.actors: list[dict] = []  # each scorer's node, GPUs and device
                self.limits: dict[int, int | None] = {}  # pid -> patches a search holds
                self.faults: dict[str, list[tuple[str, str]]] = {}  # batch -> (where, error)

            def add(
                self, k: int, pid: int = 0, rss_mb: float = 0.0, busy: float = 0.0,
                search_limit: int | None = None,
            ) -> None:  # fmt: skip
                self.n += k
                self.busy += busy
                self.peak_rss[pid] = max(rss_mb, self.peak_rss.get(pid, 0.0))
                self.limits[pid] = search_limit

            def get(self) -> int:
                return self.n

            def register(self, info: dict) -> None:
                self.actors.append(info)

            def device_fault(self, batch: str, where: str, error: str) -> list:
                self.faults.setdefault(batch, []).append((where, error[:300]))
                return self.faults[batch]

            def faults_of(self, batch: str) -> int:
                return len(self.faults.get(batch, ()))

            def telemetry(self) -> dict:
                return {
                    "actor_peak_rss_mb": round(max(self.peak_rss.values(), default=0.0), 1),
                    "actor_busy_seconds": round(self.busy, 2),
                    "actors": [
                        {**a, "search_limit": self.limits.get(a["pid"])}
                        for a in self.actors[:MAX_ACTORS_RECORDED]
                    ],
                    "device_faults": sum(len(f) for f in self.faults.values()),
                }

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a counter on a worker node would die with that node, and the
        # job must survive node failures (the driver's own node is one it cannot survive).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = Counter.options(scheduling_strategy=here).remote()
        self.total, self.enabled = total, enabled
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def telemetry(self) -> dict:
        """For job.json: the largest peak RSS any scorer reported, the seconds they spent
        scoring, each scorer's node, GPUs and device, and how many device faults were retried;
        Nones if the counter is gone (it is only telemetry and must never fail a job)."""
        import ray

        try:
            return ray.get(self.actor.telemetry.remote(), timeout=30)
        except Exception:
            log.warning("could not read the scorers' telemetry", exc_info=True)
            return {"actor_peak_rss_mb": None, "actor_busy_seconds": None}

    def done(self) -> int:
        import ray

        return int(ray.get(self.actor.get.remote()))

    def line(self) -> str:
        n = self.done()
        elapsed = max(1e-9, time.time() - self.started)
        rate = n / elapsed
        eta = (self.total - n) / rate if rate > 0 else float("nan")
        eta_s = "?" if eta != eta else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        return f"scored {n:,}/{self.total:,} patches | {rate:.1f} patches/s | ETA {eta_s}"

    def _run(self) -> None:
        tty = sys.stderr.isatty()
        interval = 1.0 if tty else 15.0
        while not self._stop.wait(interval):
            try:
                text = self.line()
            except Exception:  # the cluster is going away; the job itself reports errors
                return
            sys.stderr.write(("\r" + text) if tty else (text + "\n"))
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
            if exc[0] is None:  # the final count, also where no line was due yet
                with contextlib.suppress(Exception):
                    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + self.line())
            sys.stderr.write("\n")
