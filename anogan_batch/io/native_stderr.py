"""Lines that native code writes to the command's stderr and that are not news, dropped.

Ray's core worker writes its ERROR-level lines straight to file descriptor 2, and every Ray
Data job with an actor pool gets one: "Actor with class name: 'MapWorker(...)' ... has
constructor arguments in the object store and max_restarts > 0" (ray-project/ray#57733). The
arguments are Ray Data's own (its DataContext and the map function, which the driver puts in
the object store and holds for the job's life), so the scoring actors' restarts are safe
(docs/reliability.md), and a new user's first screen must not carry an error that is none.

The command line (cli.main) routes descriptor 2 through a pipe whose reader thread passes every
line on except those matching DROPPED. Python's own writes (sys.stderr, logging, faulthandler)
go to the real stderr directly, so a terminal stays a terminal; Ray keeps the full lines in its
log files (python-core-driver-*.log). `drain` puts descriptor 2 back and lets the reader
finish before the process ends (io/exiting.leave).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import sys
import threading

DROPPED = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*\)' and ID: '\w+' has "
        r"constructor arguments in the object store and max_restarts > 0\."
    ),
)
DRAIN_S = 2.0  # how long the process waits for the reader at exit

_state: dict[str, object] = {}


def filter_native_stderr() -> None:
    """Route this process's descriptor 2 through the filter (once; a no-op if it is closed)."""
    if _state:
        return
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    stream = open(  # noqa: SIM115 - lives as long as the process
        os.dup(real), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
    )
    sys.stderr.flush()
    sys.stderr = stream
    if faulthandler.is_enabled():  # a crash's stack must not depend on a Python thread
        faulthandler.enable(file=stream)
    thread = threading.Thread(target=_pump, args=(read_end, real), daemon=True)
    thread.start()
    _state.update(real=real, thread=thread)


def drain() -> None:
    """Put descriptor 2 back and let the reader pass on what it still holds."""
    if not _state:
        return
    real, thread = _state["real"], _state["thread"]
    with contextlib.suppress(OSError):
        os.dup2(real, 2)  # closes our write end: the reader sees the end of the pipe
    thread.join(timeout=DRAIN_S)


def _pump(read_end: int, real: int) -> None:
    with open(read_end, "rb", buffering=0) as source:
        pending = b""
        while chunk := source.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _pass_on(real, line + b"\n")
        if pending:
            _pass_on(real, pending)


def _pass_on(real: int, line: bytes) -> None:
    text = line.decode("utf-8", errors="replace")
    if any(p.search(text) for p in DROPPED):
        return
    with contextlib.suppress(OSError):
        os.write(real, line)
