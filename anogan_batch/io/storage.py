"""Paths that are local or `s3://bucket/prefix`, behind one small API over `pyarrow.fs`.

Every reader and writer in the package (pyarrow, Ray Data, JSON and image helpers) gets its
filesystem from `filesystem_for`, so the S3 endpoint, region and retry policy are set in one
place (s3.py). pyarrow does not read `AWS_ENDPOINT_URL_S3` itself; we do, and pass it on.
Credentials come from the standard AWS chain inside the AWS SDK; they are never read, printed
or logged here.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anogan_batch.errors import InputError
from anogan_batch.io.s3 import is_s3, s3_endpoint, s3_filesystem, s3_region

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    import pyarrow.fs as pafs

    if is_s3(path):
        inner = path[len("s3://") :].rstrip("/")
        if not inner:
            raise InputError(f"'{path}' names no bucket")
        if "@" in inner.split("/")[0]:  # s3://KEY:SECRET@bucket/...: never echo it back
            raise InputError(
                f"'s3://...@{inner.split('@', 1)[1]}': credentials in an s3:// URI are not "
                "supported; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile) instead"
            )
        return s3_filesystem(s3_endpoint(), s3_region()), inner
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


@dataclass(frozen=True)
class Listed:
    """One entry found under a folder by `walk`."""

    path: str  # to open it: an s3:// URI, or a local path (undecodable bytes as surrogates)
    name: str  # relative to the folder, '/'-separated, printable (undecodable bytes as \\xNN)
    size: int = 0
    problem: str | None = None  # why it cannot be read: a link loop, a FIFO, a locked folder ...

    @property
    def shown(self) -> str:
        """`path` as text that can be printed and stored (undecodable bytes as \\xNN)."""
        return _printable(self.path)

    @property
    def utf8(self) -> bool:
        """Whether `path` is valid UTF-8 (pyarrow and Ray need that; Python's open does not)."""
        try:
            self.path.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True


def walk(path: str) -> list[Listed]:
    """Every file under `path` (a folder, a file or an s3:// prefix), recursively, sorted by
    name. Hidden entries (leading '.' or '_') are skipped, as Parquet readers do. Nothing found
    there is trusted: links are followed but never into a folder already listed (no cycles,
    no file twice), and what cannot be listed or is not a regular file comes back with a
    `problem` instead of being opened (a FIFO would block a reader for ever)."""
    if is_s3(path):
        return _walk_s3(path)
    return sorted(_walk_local(os.path.abspath(path)), key=lambda f: f.name)


def _walk_s3(path: str) -> list[Listed]:
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [Listed("s3://" + info.path, posixpath.basename(info.path), info.size or 0)]
    sel = pafs.FileSelector(inner, recursive=True, allow_not_found=True)
    out = []
    for f in fs.get_file_info(sel):
        rel = posixpath.relpath(f.path, inner)
        if f.type != pafs.FileType.File or _hidden(rel):
            continue
        out.append(Listed("s3://" + f.path, rel, f.size or 0))
    return sorted(out, key=lambda f: f.name)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _printable(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk_local(root: str) -> list[Listed]:
    import stat

    try:
        top = os.stat(root)
    except OSError as e:
        raise InputError(f"'{_printable(root)}' cannot be read: {e.strerror}") from e
    if not stat.S_ISDIR(top.st_mode):
        return [_local_entry(root, _printable(os.path.basename(root)), top)]
    seen = {(top.st_dev, top.st_ino)}
    out: list[Listed] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            name = _printable(os.path.relpath(folder, root))
            out.append(Listed(folder, name, problem=f"folder cannot be listed: {e.strerror}"))
            continue
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            name = _printable(os.path.relpath(entry.path, root).replace(os.sep, "/"))
            try:
                st = os.stat(entry.path)  # follows links
            except OSError as e:
                why = "a link loop" if e.errno == errno.ELOOP else e.strerror
                out.append(Listed(entry.path, name, problem=f"cannot be opened: {why}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    problem = "a link to a folder listed already (a cycle or a duplicate)"
                    out.append(Listed(entry.path, name, problem=problem))
                else:
                    seen.add((st.st_dev, st.st_ino))
                    folders.append(entry.path)
                continue
            out.append(_local_entry(entry.path, name, st))
    return out


def _local_entry(path: str, name: str, st: os.stat_result) -> Listed:
    import stat

    if not stat.S_ISREG(st.st_mode):
        return Listed(path, name, problem="not a regular file (a FIFO, socket or device)")
    return Listed(path, name, st.st_size)


def list_files(path: str, *, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files under `path`, recursively, sorted, as paths of the same kind as `path`.

    Hidden files and folders (leading '.' or '_') are skipped, as Parquet readers do. A file
    with one of `suffixes` that cannot be read (see `walk`) is an InputError naming it: a
    table must not lose a file silently.
    """
    if not is_s3(path) and not os.path.lexists(path):
        return []
    out = []
    for f in walk(path):
        folder_problem = f.problem is not None and f.problem.startswith("folder")
        if suffixes and not f.name.lower().endswith(suffixes) and not folder_problem:
            continue
        if f.problem is not None:
            raise InputError(f"'{_printable(path)}': '{f.name}' {f.problem}")
        if not f.utf8:
            raise InputError(f"'{_printable(path)}': file name '{f.name}' is not valid UTF-8")
        out.append(f.path)
    return sorted(out)


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes; with `limit`, at most limit + 1 of them, so that a caller can refuse
    a file over its limit without holding what a size from data asks for."""
    fs, inner = filesystem_for(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError as e:
        raise InputError(f"'{path}' does not exist") from e


def open_input(path: str):
    """A seekable binary file for random reads (a slide's tiles): the local file, or S3 ranged
    reads through pyarrow. The caller closes it."""
    if not is_s3(path):
        return open(path, "rb")
    fs, inner = filesystem_for(path)
    return fs.open_input_file(inner)


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


def move(src: str, dest: str) -> None:
    """Move one file within its filesystem (on S3 a copy, then a delete)."""
    fs, inner = filesystem_for(src)
    _, target = filesystem_for(dest)
    if not is_s3(dest):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.move(inner, target)


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
