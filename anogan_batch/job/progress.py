"""The live progress line of a scoring job and the scorers' telemetry (memory, busy time)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

log = logging.getLogger(__name__)


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

            def add(self, k: int, pid: int = 0, rss_mb: float = 0.0, busy: float = 0.0) -> None:
                self.n += k
                self.busy += busy
                self.peak_rss[pid] = max(rss_mb, self.peak_rss.get(pid, 0.0))

            def get(self) -> int:
                return self.n

            def telemetry(self) -> tuple[float, float]:
                return max(self.peak_rss.values(), default=0.0), self.busy

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a counter on a worker node would die with that node, and the
        # job must survive node failures (the driver's own node is one it cannot survive).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = Counter.options(scheduling_strategy=here).remote()
        self.total, self.enabled = total, enabled
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def telemetry(self) -> dict[str, float | None]:
        """Largest peak RSS any scorer reported and the seconds they spent scoring; None if
        the counter is gone (it is only telemetry and must never fail a job)."""
        import ray

        try:
            rss, busy = ray.get(self.actor.telemetry.remote(), timeout=30)
            return {"actor_peak_rss_mb": round(rss, 1), "actor_busy_seconds": round(busy, 2)}
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
