"""io/native_stderr.py: the command's stderr without native lines that are not news (that a
healthy job prints no error-level line is held by test_cli.py's end-to-end test)."""

from __future__ import annotations

import subprocess
import sys

RAY_LINE = (
    "[2026-12-07 12:41:36,516 E 9403 9403] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(PatchScorer))' and ID: '136e2919c75af29a701723a101000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail."
)

SCRIPT = f"""
import os, sys
from anogan_batch.io.exiting import leave
from anogan_batch.io.native_stderr import filter_native_stderr
filter_native_stderr()
os.write(2, {RAY_LINE!r}.encode() + b"\\n")  # as native code writes: to descriptor 2
os.write(2, b"[x E 1 1] raylet_client.cc:10: a real native error\\n")
print("a Python line", file=sys.stderr)
os.write(2, b"an unfinished native line")
leave(3)
"""


def test_only_the_known_native_line_is_dropped_and_nothing_is_lost_at_exit():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert "constructor arguments in the object store" not in r.stderr
    assert "a real native error" in r.stderr and "a Python line" in r.stderr
    assert r.stderr.endswith("an unfinished native line")
