"""Paths and URIs through one filesystem layer, so s3://, gs:// and local runs share every code path.

Everything here takes URI strings (which pickle cheaply to Ray workers) and resolves them to a
pyarrow filesystem on use. Schemes pyarrow does not know natively (memory://, and any other fsspec
protocol) go through fsspec wrapped in a pyarrow ``PyFileSystem``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curate.checksums import Digest, FileFollower, HashingSink, Streamed, file_digest, stream_digest

_PYARROW_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def has_scheme(uri: str) -> bool:
    return "://" in uri


def is_local(uri: str) -> bool:
    """A path on this machine (plain or file://): cheap to check before any work, unlike object stores."""
    return not has_scheme(uri) or uri.lower().startswith("file://")


def absolute(uri: str) -> str:
    """Local paths become absolute (relative to the working directory); URIs stay as they are."""
    return uri if has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))


@functools.lru_cache(maxsize=64)
def _filesystem_for(scheme: str, netloc: str) -> pafs.FileSystem:
    if scheme in ("", "local"):
        return pafs.LocalFileSystem()
    if scheme in _PYARROW_SCHEMES:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return fs
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme)))


def use_environment(variables: dict[str, str]) -> None:
    """Set variables the filesystems read when made (AWS_ENDPOINT_URL, credentials: a pipeline's `storage:`), and
    forget filesystems made before, so the next s3:// path gets a client that sees them."""
    if variables:
        os.environ.update(variables)
        _filesystem_for.cache_clear()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if not has_scheme(uri):
        return _filesystem_for("", ""), absolute(uri)
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return _filesystem_for("", ""), "/" + rest.lstrip("/")
    if scheme in _PYARROW_SCHEMES:
        netloc = rest.split("/", 1)[0]
        return _filesystem_for(scheme, netloc), rest.rstrip("/")
    return _filesystem_for(scheme, ""), rest.rstrip("/")


def join(uri: str, *parts: str) -> str:
    if has_scheme(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def remove_file(uri: str) -> bool:
    """Delete one file; False if it was not there."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        return False
    return True


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@dataclass(frozen=True)
class FileEntry:
    uri: str
    relative: str  # path below the listed root, with forward slashes
    size: int


def _below(path: str, base: str) -> str:
    """``path`` relative to ``base``; some fsspec filesystems add or drop a leading slash, so compare without."""
    path, base = path.replace(os.sep, "/").lstrip("/"), base.replace(os.sep, "/").strip("/")
    return posixpath.relpath(path, base) if base else path


def list_files(root: str, pattern: str | None = None, recursive: bool = True) -> list[FileEntry]:
    """Files under ``root`` (sorted by relative path), optionally filtered by a glob on the relative path."""
    fs, base = resolve(root)
    selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
    entries = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = _below(info.path, base)
        if pattern and not fnmatch.fnmatchcase(relative, pattern):
            continue
        entries.append(FileEntry(join(root, relative), relative, info.size))
    entries.sort(key=lambda e: e.relative)
    return entries


_GLOB_CHARS = frozenset("*?[")


def has_glob(uri: str) -> bool:
    return bool(_GLOB_CHARS & set(uri))


def split_glob(uri: str) -> tuple[str, str]:
    """(folder before the first glob character, the pattern below it)."""
    parts = uri.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return "/".join(parts[:i]) or "/", "/".join(parts[i:])
    return uri, ""


def expand(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Files named or matched, in the order given: brace lists first (``{00000..00099}.tar``, ``{a,b}``, as
    img2dataset and webdataset write them; the braceexpand package, which webdataset uses), then globs (each
    glob's matches sorted). A glob that matches nothing is an error; a plain name is returned as it is."""
    from braceexpand import braceexpand

    files: list[str] = []
    for pattern in patterns:
        for name in braceexpand(pattern):
            if not has_glob(name):
                files.append(name)
                continue
            root, rest = split_glob(name)
            matched = [e.uri for e in list_files(root, rest)]
            if not matched:
                raise FileNotFoundError(f"no file matches {name}")
            files.extend(matched)
    return files


def list_names(root: str) -> list[str]:
    """Names directly inside a folder (files and folders), sorted; empty if it does not exist."""
    fs, base = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def _temporary_sibling(fs: pafs.FileSystem, path: str) -> str:
    parent = posixpath.dirname(path)
    fs.create_dir(parent, recursive=True)
    return posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")


def write_atomic(uri: str, data: bytes) -> None:
    """Write to a temporary sibling name, then rename: readers never see a partial file."""
    fs, path = resolve(uri)
    tmp = _temporary_sibling(fs, path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_json(uri: str, obj: Any) -> None:
    write_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_atomic(
    uri: str,
    table: pa.Table,
    row_group_size: int | None = None,
    row_group_sizes: tuple[int, ...] | list[int] | None = None,
    digest: Digest | None = None,
    **options: Any,
) -> int:
    """Stream a Parquet file to a temporary name and rename it into place; returns its size in bytes.

    ``row_group_sizes`` (row counts, summing to the table's rows) places row-group boundaries exactly;
    ``digest`` is updated with every byte written (the shard checksum): on a local disk by a thread that hashes
    the file from the page cache as it grows, elsewhere from the buffers pyarrow writes (curate.checksums)."""
    if row_group_sizes is not None and sum(row_group_sizes) != table.num_rows:
        raise ValueError(f"row group sizes add up to {sum(row_group_sizes)}, not {table.num_rows} rows")
    fs, path = resolve(uri)
    tmp = _temporary_sibling(fs, path)
    local = isinstance(fs, pafs.LocalFileSystem)
    follower: FileFollower | None = None
    try:
        with fs.open_output_stream(tmp) as stream:
            if digest is not None and local:
                follower = FileFollower(tmp, digest)
            sink = HashingSink(stream, digest) if digest is not None and not local else stream
            with contextlib.closing(sink):
                if row_group_sizes is None:
                    pq.write_table(table, sink, row_group_size=row_group_size, **options)
                else:
                    with pq.ParquetWriter(sink, table.schema, **options) as writer:
                        start = 0
                        for rows in row_group_sizes:
                            writer.write_table(table.slice(start, rows), row_group_size=max(1, rows))
                            start += rows
    except BaseException:
        if follower is not None:
            follower.abandon()
        raise
    if follower is not None:
        follower.finish()
    size = digest.size if digest is not None else fs.get_file_info(tmp).size
    fs.move(tmp, path)
    return int(size or 0)


@contextlib.contextmanager
def parquet_writer(uri: str, schema: pa.Schema, **options: Any) -> Iterator[pq.ParquetWriter]:
    """A streaming Parquet writer (one row group per ``write_table``) on a temporary name, renamed into place
    when the block exits without an error; for files too large to build as one table first."""
    fs, path = resolve(uri)
    tmp = _temporary_sibling(fs, path)
    with fs.open_output_stream(tmp) as sink, pq.ParquetWriter(sink, schema, **options) as writer:
        yield writer
    fs.move(tmp, path)


def remove_temporaries(folder_uri: str) -> int:
    """Delete ``.tmp-*`` leftovers of interrupted writes directly inside a folder."""
    fs, base = resolve(folder_uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    removed = 0
    for info in infos:
        if info.type == pafs.FileType.File and posixpath.basename(info.path).startswith(".tmp-"):
            fs.delete_file(info.path)
            removed += 1
    return removed


def read_digest(uri: str) -> Streamed:
    """Size, checksum and last bytes of a file, read once from start to end in large sequential reads."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return file_digest(path)
    with fs.open_input_stream(path) as f:
        return stream_digest(f)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_file(uri: str) -> pq.ParquetFile:
    fs, path = resolve(uri)
    return pq.ParquetFile(fs.open_input_file(path))
