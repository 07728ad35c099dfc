"""S3 for every reader and writer of the product: one filesystem, one retry policy.

`s3_filesystem` is pyarrow's S3FileSystem (endpoint from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, region, credentials from the standard AWS chain, never read or printed
here) behind `RetryingS3`, which retries what the AWS SDK does not (the last step of a
write, a short ranged read answered with an error body). Ray Data gets the same filesystem
object, so its reads, writes and checkpoints follow the same policy; pyiceberg gets it as
FileIO properties and deltalake as object_store options. `describe_s3_failure` turns an S3
error that outlived the policy into the message the CLI prints (exit 1; a rerun resumes).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from anogan_batch.errors import ConfigError

log = logging.getLogger(__name__)


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (service-specific variable first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def shown_endpoint() -> str:
    """The S3 endpoint for messages: without any user:password part of the URL."""
    endpoint = s3_endpoint()
    if not endpoint:
        return f"https://s3.{s3_region()}.amazonaws.com"
    parsed = urlparse(endpoint)
    return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()


@dataclass(frozen=True)
class S3RetryPolicy:
    """How every S3 client of the product retries: pyarrow's (all table, file and Ray Data
    I/O) and object_store's (Delta). Throttling (503 SlowDown), 5xx answers, resets and
    timeouts are retried with exponential backoff and jitter, `max_attempts` tries in all;
    then the error reaches the job, which fails with job.json left for a rerun to resume.
    Set by ANOGAN_S3_MAX_ATTEMPTS, ANOGAN_S3_CONNECT_TIMEOUT and ANOGAN_S3_REQUEST_TIMEOUT
    (seconds). docs/reliability.md has the whole policy."""

    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> S3RetryPolicy:
        values: dict[str, Any] = {}
        for var, name, kind in (
            ("ANOGAN_S3_MAX_ATTEMPTS", "max_attempts", int),
            ("ANOGAN_S3_CONNECT_TIMEOUT", "connect_timeout_s", float),
            ("ANOGAN_S3_REQUEST_TIMEOUT", "request_timeout_s", float),
        ):
            raw = os.environ.get(var)
            if raw is None:
                continue
            try:
                values[name] = kind(raw)
                if not values[name] > 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(var, raw, "must be a positive number") from None
        return cls(**values)

    def pyarrow(self) -> dict[str, Any]:
        return {
            "retry_strategy": PolicyRetryStrategy(self.max_attempts),
            "connect_timeout": self.connect_timeout_s,
            "request_timeout": self.request_timeout_s,
        }

    def pyiceberg(self) -> dict[str, str]:
        """The same policy in pyiceberg's FileIO properties (its own S3FileSystem)."""
        return {
            "s3.retry-strategy-impl": f"{__name__}.{PolicyRetryStrategy.__name__}",
            "s3.connect-timeout": str(self.connect_timeout_s),
            "s3.request-timeout": str(self.request_timeout_s),
        }

    def object_store(self) -> dict[str, str]:
        """The same policy in object_store's (deltalake's) storage options."""
        return {
            "max_retries": str(self.max_attempts - 1),
            "retry_timeout": f"{int(self.max_attempts * self.request_timeout_s)}s",
            "connect_timeout": f"{int(self.connect_timeout_s)}s",
            "timeout": f"{int(self.request_timeout_s)}s",
        }


class PolicyRetryStrategy(pafs.AwsDefaultS3RetryStrategy):
    """The AWS SDK's retries under the policy: `max_attempts` tries of every request, 5xx,
    throttling, resets and timeouts retried with exponential backoff.

    Not the SDK's "standard" strategy (pyarrow's AwsStandardS3RetryStrategy): its retry quota
    (500 tokens, 5 a retry) is never refilled through pyarrow, so a filesystem stops retrying
    for good after its 100th retry; at 10 % throttling that is the 1,000th request of a
    process. Built with no argument (pyiceberg's `s3.retry-strategy-impl`), it reads the
    policy from the environment."""

    def __init__(self, max_attempts: int | None = None) -> None:
        attempts = max_attempts or S3RetryPolicy.from_env().max_attempts
        super().__init__(max_attempts=attempts - 1)  # the SDK counts retries, not tries


def object_store_options(uri: str) -> dict[str, str] | None:
    """Storage options for object_store-based clients (deltalake) on `uri`: endpoint, region
    and retry policy from the same environment as pyarrow's; credentials stay in the AWS
    chain, never in these options."""
    if not is_s3(uri):
        return None
    # deltalake commits to S3 with conditional puts (If-None-Match): concurrent writers of one
    # table (the warehouse's, warehouse/delta_tables.py) are safe with no locking provider
    options = dict(S3RetryPolicy.from_env().object_store())
    endpoint = s3_endpoint()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    options["AWS_REGION"] = s3_region()
    return options


S3_FAILURE_MARKERS = ("AWS Error", "curlCode", "Generic S3 error", "error sending request")


def is_s3_failure(text: str) -> bool:
    """Whether an error's text is an S3 client's (pyarrow's AWS SDK, object_store's) failure."""
    return any(marker in text for marker in S3_FAILURE_MARKERS)


def describe_s3_failure(exc: BaseException) -> str | None:
    """A one-paragraph message for an S3 failure that outlived the retry policy (anywhere in
    the exception's chain, Ray's task errors included), or None if it is not one."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e)
        if is_s3_failure(text):
            line = next((ln for ln in text.splitlines() if is_s3_failure(ln)), text)
            return (
                f"S3 at {shown_endpoint()} failed after the retry policy "
                f"({S3RetryPolicy.from_env().max_attempts} attempts a request): "
                f"{line.strip()[:400]}. Nothing is lost: rerun the same command when S3 "
                "answers again and the job resumes where it stopped."
            )
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


# what a retried S3 write may fail with, as the AWS SDK words it (see RetryingS3)
TRANSIENT_S3_ERRORS = (
    "SLOW_DOWN", "INTERNAL_FAILURE", "NETWORK_CONNECTION", "SERVICE_UNAVAILABLE",
    "REQUEST_TIMEOUT", "THROTTLING", "HTTP status 5",
)  # fmt: skip


def retry_transient(fn, what: str, policy: S3RetryPolicy | None = None):
    """Call `fn` (an idempotent S3 operation) until it does not fail with a transient S3
    error, at most `max_attempts` times, sleeping `backoff` between tries. The policy is read
    at the first failure only: this wraps every read of an S3 file."""
    attempt = 1
    while True:
        try:
            return fn()
        except OSError as e:
            policy = policy or S3RetryPolicy.from_env()
            if attempt >= policy.max_attempts or not any(m in str(e) for m in TRANSIENT_S3_ERRORS):
                raise
            log.debug("%s: transient S3 error, retrying (%d/%d): %s", what, attempt,
                      policy.max_attempts, str(e)[:200])  # fmt: skip
            backoff(attempt)
            attempt += 1


def run_retried_child(cmd: list[str], policy: S3RetryPolicy | None = None):
    """Run a child process whose work on S3 is idempotent (deltalake's: a conversion with
    mode "ignore", an exactly-once publish), and run it again from the start while it fails
    with an S3 error, up to the policy's attempts, with the same backoff: object_store gives
    up on some transient faults at once ("Generic S3 error"). -> the last CompletedProcess."""
    import subprocess

    policy = policy or S3RetryPolicy.from_env()
    for attempt in range(1, policy.max_attempts + 1):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 or not is_s3_failure(done.stderr):
            return done
        if attempt < policy.max_attempts:
            log.debug("S3 failure in a child, running it again (%d/%d)", attempt,
                      policy.max_attempts)  # fmt: skip
            backoff(attempt)
    return done


def backoff(attempt: int) -> None:
    """The policy's pause after failed try `attempt`: exponential, full jitter, 10 s at most."""
    import random
    import time

    time.sleep(random.uniform(0, min(10.0, 0.2 * 2**attempt)))


class RetryingS3(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over S3FileSystem that retries whole writes.

    The AWS SDK retries every S3 request under the configured strategy except one: the
    CompleteMultipartUpload that ends every written file (aws-sdk issue, seen as "AWS Error
    SLOW_DOWN during CompleteMultipartUpload"). A written file is therefore buffered and
    written again from the start if that last step fails transiently. Writes are idempotent
    here (every file is written whole under a name that a rerun writes again), so a retry
    can never leave two copies. Everything else goes straight to S3FileSystem.
    """

    def __init__(self, endpoint: str | None, region: str) -> None:
        self.endpoint, self.region = endpoint, region
        self.inner = _native_s3(endpoint, region)

    def __reduce__(self):  # Ray ships filesystems to its workers
        return (RetryingS3, (self.endpoint, self.region))

    def get_type_name(self) -> str:
        return "anogan-s3"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.inner.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.inner.move(src, dest)

    def copy_file(self, src, dest):
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return pa.PythonFile(_RetriedReads(self.inner.open_input_file(path), path), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_WholeWrite(self.inner, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError("S3 has no append")


class _RetriedReads:
    """A native S3 input file whose reads are retried under the policy.

    The AWS SDK writes an error answer's body into the buffer of a ranged read; a 503's XML
    body (a few hundred bytes) overflows a shorter read (a small column chunk, a footer) and
    the SDK gives up without a retry ("INTERNAL_FAILURE ... Failed to flush response stream").
    Every read here is made at an offset this object keeps, so a failed one is made again."""

    def __init__(self, inner: pa.NativeFile, path: str) -> None:
        self.inner, self.path, self.position, self.closed = inner, path, 0, False

    def size(self) -> int:
        return self.inner.size()

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.size()}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, nbytes: int | None = None) -> bytes:
        if nbytes is None or nbytes < 0:
            nbytes = self.size() - self.position
        at = self.position
        data = retry_transient(lambda: self.inner.read_at(nbytes, at), f"read s3://{self.path}")
        self.position += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.inner.close()
        self.closed = True


class _WholeWrite(io.BytesIO):
    """An output stream that writes its bytes to S3 in one retried upload when closed."""

    def __init__(self, fs, path: str, metadata) -> None:
        super().__init__()
        self.fs, self.path, self.metadata = fs, path, metadata

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()

        def upload() -> None:
            with self.fs.open_output_stream(self.path, metadata=self.metadata) as f:
                f.write(data)

        retry_transient(upload, f"write s3://{self.path}")


@functools.cache
def s3_filesystem(endpoint: str | None, region: str) -> pafs.FileSystem:
    """The filesystem every S3 path of the product goes through."""
    return pafs.PyFileSystem(RetryingS3(endpoint, region))


@functools.cache
def _native_s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    _release_at_exit()
    kwargs: dict[str, Any] = {"region": region, **S3RetryPolicy.from_env().pyarrow()}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # Custom endpoints (MinIO, moto, Ceph) rarely support virtual-host addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


@functools.cache
def _release_at_exit() -> None:
    """Drop the cached filesystems when the interpreter exits, before pyarrow's S3 finalizer
    (exit handlers run last-registered first, and pyarrow registers its own on import): a
    filesystem that outlives that finalizer can deadlock it (apache/arrow#50188). The command
    line skips the finalizer altogether (io/exiting.py); this is for notebooks and scripts."""
    import atexit

    def release() -> None:
        import gc

        s3_filesystem.cache_clear()
        _native_s3.cache_clear()
        gc.collect()

    atexit.register(release)
