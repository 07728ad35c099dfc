"""Paths that are local or `s3://bucket/prefix`, behind one small API over `pyarrow.fs`.

Every reader and writer in the package (pyarrow, Ray Data, JSON and image helpers) gets its
filesystem from `filesystem_for`, so the S3 endpoint, region and retry policy are set in one
place. pyarrow does not read `AWS_ENDPOINT_URL_S3` itself; we do, and pass it on.
Credentials come from the standard AWS chain inside the AWS SDK; they are never read, printed
or logged here.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from anogan_batch.errors import InputError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (service-specific variable first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.cache
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {
        "region": region,
        # Standard AWS retry policy: backs off on throttling (SlowDown, 503) and transient
        # network errors.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # Custom endpoints (MinIO, moto, Ceph) rarely support virtual-host addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    import pyarrow.fs as pafs

    if is_s3(path):
        inner = path[len("s3://") :].rstrip("/")
        if not inner:
            raise InputError(f"'{path}' names no bucket")
        return _s3_filesystem(s3_endpoint(), s3_region()), inner
    if "://" in path:
        raise InputError(f"'{path}': only local paths and s3:// URIs are supported")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers may run elsewhere); URIs unchanged."""
    return path if is_s3(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts the way the base's filesystem expects (s3 URIs keep their scheme)."""
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        return True
    # S3 has no directories: a prefix with objects under it counts as one.
    if is_s3(path) and info.type == pafs.FileType.NotFound:
        sel = pafs.FileSelector(inner, recursive=False, allow_not_found=True)
        return bool(fs.get_file_info(sel))
    return False


def list_files(path: str, *, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files under `path`, recursively, sorted, as paths of the same kind as `path`.

    Hidden files and folders (leading '.' or '_') are skipped, as Parquet readers do.
    """
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    out = []
    for f in infos:
        if f.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(f.path, inner) if f.path != inner else posixpath.basename(f.path)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if suffixes and not f.path.lower().endswith(suffixes):
            continue
        out.append("s3://" + f.path if is_s3(path) else f.path)
    return sorted(out)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem_for(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError as e:
        raise InputError(f"'{path}' does not exist") from e


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. Local writes are atomic (temp file + rename); S3 PUTs are atomic."""
    fs, inner = filesystem_for(path)
    if is_s3(path):
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(inner), exist_ok=True)
    tmp = f"{inner}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, inner)


def read_json(path: str) -> Any:
    raw = read_bytes(path)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"'{path}' is not valid JSON: {e}") from e


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def makedirs(path: str) -> None:
    if not is_s3(path):
        os.makedirs(path, exist_ok=True)


def delete(path: str) -> None:
    """Delete a file or a whole directory tree; a missing path is not an error."""
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        fs.delete_file(inner)
    elif info.type == pafs.FileType.Directory or is_s3(path):
        try:
            fs.delete_dir(inner)
        except (FileNotFoundError, OSError):
            if not is_s3(path):
                raise
