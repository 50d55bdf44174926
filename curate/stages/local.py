"""`local` source: a folder or glob of image files into image shards, one row per file found.

Each file is read, decoded once to check it and measure it (the decoded pixels are not kept: the
original bytes are stored, untouched), and becomes a row. Files that cannot be read or decoded
become rows with a status and the reason; nothing found by the listing is dropped.
"""

from __future__ import annotations

import functools
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, PositiveInt, field_validator

from curate import storage
from curate.config import StageConfig, Strict
from curate.images import DEFAULT_MAX_PIXELS
from curate.ingest.rows import check_image
from curate.runfolder import ShardTask, StageDir
from curate.schema import IMAGE_SCHEMA, make_key
from curate.stages.spec import ShardOutput, StageSpec, WorkContext

_GLOB_CHARS = set("*?[")


class TableCaptions(Strict):
    """Captions from a side table (Parquet or CSV) keyed by the image's path below the input root."""

    table: str
    file_column: str = "file"
    caption_column: str = "caption"

    @field_validator("table")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return storage.absolute(value)

    def check(self) -> list[tuple[tuple[Any, ...], str]]:
        if not storage.is_local(self.table):
            return []
        if not storage.exists(self.table):
            return [(("captions", "table"), f"no such file: {self.table}")]
        columns = _table_columns(self.table)
        return [
            (("captions", field), f"no column {name!r} in {self.table} (columns: {', '.join(columns)})")
            for field, name in (("file_column", self.file_column), ("caption_column", self.caption_column))
            if name not in columns
        ]


class LocalConfig(StageConfig):
    kind: Literal["local"]
    is_source: ClassVar[bool] = True

    path: str = Field(description="a folder (searched recursively) or a glob such as photos/**/*.jpg")
    extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif")
    captions: Literal["txt", "none"] | TableCaptions = "txt"
    shard_size: PositiveInt = 1000
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    threads: PositiveInt = 8  # files read and checked at once inside one worker

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return storage.absolute(value)

    @field_validator("extensions")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower().lstrip(".") for e in value)

    def root_and_pattern(self) -> tuple[str, str | None]:
        parts = self.path.split("/")
        for i, part in enumerate(parts):
            if _GLOB_CHARS & set(part):
                return "/".join(parts[:i]) or "/", "/".join(parts[i:])
        return self.path, None

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Local inputs must exist; remote ones (s3://, gs://) are checked where the stage plans, on the cluster."""
        root, _ = self.root_and_pattern()
        problems = []
        if storage.is_local(root) and not storage.is_dir(root):
            problems.append((("path",), f"no such folder: {root}"))
        if isinstance(self.captions, TableCaptions):
            problems += self.captions.check()
        return problems


def _matches(relative: str, pattern: str) -> bool:
    import fnmatch

    if fnmatch.fnmatchcase(relative, pattern):
        return True
    return pattern.startswith("**/") and fnmatch.fnmatchcase(relative, pattern[3:])


def plan(config: LocalConfig, upstream: StageDir | None) -> list[ShardTask]:
    root, pattern = config.root_and_pattern()
    if pattern is None:
        files = [
            f.relative
            for f in storage.list_files(root)
            if posixpath.splitext(f.relative)[1].lower().lstrip(".") in config.extensions
            and not posixpath.basename(f.relative).startswith(".")
        ]
    else:
        files = [f.relative for f in storage.list_files(root) if _matches(f.relative, pattern)]
    size = config.shard_size
    return [ShardTask(i, tuple(files[start : start + size])) for i, start in enumerate(range(0, len(files), size))]


def _read_table(uri: str) -> pa.Table:
    if uri.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as f:
            return pacsv.read_csv(f)
    return storage.read_parquet(uri)


def _table_columns(uri: str) -> list[str]:
    if uri.lower().endswith(".csv"):
        return _read_table(uri).column_names
    return storage.parquet_file(uri).schema_arrow.names


@functools.lru_cache(maxsize=4)
def _caption_table(uri: str, file_column: str, caption_column: str) -> dict[str, str]:
    """Loaded once per worker process and reused across the shards it processes."""
    table = _read_table(uri)
    files = table[file_column].to_pylist()
    captions = table[caption_column].to_pylist()
    return {str(f): c for f, c in zip(files, captions, strict=True) if c is not None}


def _caption_for(config: LocalConfig, root: str, relative: str) -> str | None:
    if config.captions == "none":
        return None
    if config.captions == "txt":
        uri = storage.join(root, posixpath.splitext(relative)[0] + ".txt")
        try:
            return storage.read_text(uri).strip()
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            return None
    table = config.captions
    return _caption_table(table.table, table.file_column, table.caption_column).get(relative)


def read_one(config: LocalConfig, root: str, relative: str) -> dict[str, Any]:
    uri = storage.join(root, relative)
    row: dict[str, Any] = {"key": make_key(relative), "url": uri, "caption": _caption_for(config, root, relative)}
    try:
        data = storage.read_bytes(uri)
    except OSError as e:
        return {**row, "status": "read_error", "error": f"{type(e).__name__}: {e}"}
    return {**row, **check_image(data, config.max_pixels)}


def process(config: LocalConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    root, _ = config.root_and_pattern()
    started = time.perf_counter()
    with ThreadPoolExecutor(config.threads) as pool:
        rows = list(pool.map(lambda rel: read_one(config, root, rel), task.inputs))
    table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
    extra = {
        "no_caption": sum(1 for r in rows if r.get("caption") is None),
        "image_bytes": sum(len(r["image"]) for r in rows if r.get("image") is not None),
        "read_seconds": round(time.perf_counter() - started, 3),
    }
    return ShardOutput(table, extra)


def describe(config: LocalConfig) -> str:
    captions = config.captions if isinstance(config.captions, str) else f"table {config.captions.table}"
    return f"{config.path} ({', '.join(config.extensions)}; captions: {captions}; {config.shard_size} files per shard)"


SPEC = StageSpec(
    kind="local",
    config=LocalConfig,
    summary="image files from a folder or glob into image shards",
    schema=IMAGE_SCHEMA,
    plan=plan,
    process=process,
    describe_inputs=describe,
)
