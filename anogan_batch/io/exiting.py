"""How a command's process ends: every output written and closed, then no interpreter teardown.

Native libraries keep threads of their own (Arrow's CPU and I/O pools, the AWS SDK's, Ray's,
deltalake's runtime). When the interpreter tears itself down while one of them still holds
work that needs Python, the process hangs in Arrow's pool shutdown or aborts ("PyGILState_Release
... finalizing", "terminate called without an active exception"); pyarrow's own S3 finalizer
can deadlock when a filesystem outlives it (apache/arrow#50188). The product leaves no such work
behind (io/tables.first_rows says how it once did), and the command line does not depend on
that: `leave` runs the Python exit handlers (Ray's shutdown, which stops a local cluster;
logging; temporary folders), except pyarrow's S3 finalizer, flushes the standard streams, and
ends the process with its code, without the interpreter's teardown. docs/reliability.md has the
measurements.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn

from anogan_batch.io import native_stderr


def leave(code: int) -> NoReturn:
    """End this process with exit status `code` once its exit handlers have run."""
    pyarrow_fs = sys.modules.get("pyarrow.fs")
    if pyarrow_fs is not None:  # nothing of the SDK's is needed after this: the OS reclaims it
        atexit.unregister(pyarrow_fs.ensure_s3_finalized)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing can reach it
                stream.flush()
        native_stderr.drain()
        os._exit(code)
