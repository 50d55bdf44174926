"""`parquet` source: Parquet tables with an image column (img2dataset's `output_format: parquet`, Hugging Face
datasets' `Image` feature) into image shards, one row per table row, planned by row group.

The reading is curate.ingest.tables; docs/sources.md describes the behaviour and docs/schema.md#parquet the
columns.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, PositiveInt, model_validator

from curate import storage
from curate.config import StageConfig, Uris
from curate.download.statuses import classify
from curate.images import DEFAULT_MAX_PIXELS
from curate.ingest.rows import ExtraColumns, build_table, table_columns
from curate.ingest.tables import (
    TableSettings,
    TableSlice,
    image_column_problem,
    pack,
    read_slice,
    row_groups,
    slice_rows,
)
from curate.runfolder import ShardTask, StageDir
from curate.schema import TABLE_SCHEMA
from curate.stages.spec import ShardOutput, StageSpec, WorkContext

RESERVED = set(TABLE_SCHEMA.names)


class ParquetConfig(StageConfig):
    kind: Literal["parquet"]
    is_source: ClassVar[bool] = True

    path: Uris = Field(min_length=1, description="Parquet files, globs or brace lists, local or s3://")
    image_column: str = "image"  # binary bytes, or a struct<bytes, path> (Hugging Face Image); img2dataset: jpg
    caption_column: str | None = "caption"  # Hugging Face datasets often: text; null for none
    url_column: str | None = None  # the sample's source URL, if the table has one (img2dataset: url)
    extra_columns: ExtraColumns = "all"  # other table columns carried into the shards: all | none | [names]
    shard_size: PositiveInt = 10_000  # rows per output shard at most (whole row groups; a larger one alone)
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    threads: PositiveInt = 4  # images decoded at once inside one worker

    @model_validator(mode="after")
    def _distinct(self) -> ParquetConfig:
        if self.image_column in (self.caption_column, self.url_column):
            raise ValueError("image_column must differ from caption_column and url_column")
        return self

    def fingerprint(self) -> str:
        """threads only change speed, so a run may be resumed with another value."""
        data = self.model_dump(exclude={"resources", "name", "threads"}, mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def column_problems(self, uri: str, schema: pa.Schema) -> list[tuple[tuple[Any, ...], str]]:
        names = schema.names
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        problems: list[tuple[tuple[Any, ...], str]] = []
        for field in ("image_column", "caption_column", "url_column"):
            column = getattr(self, field)
            if column is not None and column not in names:
                problems.append(((field,), f"no column {column!r} in {uri} (columns: {shown})"))
        if self.image_column in names:
            problem = image_column_problem(schema.field(self.image_column))
            if problem:
                problems.append((("image_column",), f"{uri}: {problem}"))
        if isinstance(self.extra_columns, tuple):
            missing = [c for c in self.extra_columns if c not in names]
            if missing:
                problems.append((("extra_columns",), f"no column {', '.join(map(repr, missing))} in {uri}"))
        return problems

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Local files must exist and have the named columns (footers only); remote ones are checked at planning."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        for i, entry in enumerate(self.path):
            if not storage.is_local(entry):
                continue
            try:
                files = storage.expand([entry])
            except FileNotFoundError as e:
                problems.append((("path", i), str(e)))
                continue
            for uri in files[:100]:
                if not storage.exists(uri):
                    problems.append((("path", i), f"no such file: {uri}"))
                    continue
                try:
                    schema = storage.parquet_file(uri).schema_arrow
                except Exception as e:
                    problems.append((("path", i), f"cannot read {uri} as Parquet: {e}"))
                    continue
                problems += self.column_problems(uri, schema)
        return problems

    def settings(self) -> TableSettings:
        return TableSettings(
            image_column=self.image_column,
            caption_column=self.caption_column,
            url_column=self.url_column,
            max_pixels=self.max_pixels,
            threads=self.threads,
        )

    def columns_to_read(self, names: list[str]) -> list[str] | None:
        if self.extra_columns == "all":
            return None
        settings = self.settings()
        needed = [self.image_column, self.caption_column, self.url_column, settings.status_column]
        needed += [settings.error_column, "original_width", "original_height"]
        extra = () if self.extra_columns == "none" else self.extra_columns
        return [c for c in dict.fromkeys([*needed, *extra]) if c is not None and c in names]


def plan(config: ParquetConfig, upstream: StageDir | None) -> list[ShardTask]:
    """Row-group sizes from every file's footer, packed into shards of at most `shard_size` rows."""
    files = []
    for uri in dict.fromkeys(storage.expand(config.path)):  # a file matched twice is read once (keys stay unique)
        problems = config.column_problems(uri, storage.parquet_file(uri).schema_arrow)
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        files.append((uri, row_groups(uri)))
    shards = pack(files, config.shard_size)
    return [ShardTask(i, tuple(piece.encode() for piece in shard)) for i, shard in enumerate(shards)]


def task_rows(config: ParquetConfig, task: ShardTask) -> int:
    return sum(TableSlice.decode(item).rows for item in task.inputs)


def img2dataset_status(status: str, message: str) -> str:
    return classify(message, "resize" if status == "failed_to_resize" else "download")


def process(config: ParquetConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    started = time.perf_counter()
    settings = config.settings()
    parts = []
    for item in task.inputs:
        piece = TableSlice.decode(item)
        names = storage.parquet_file(piece.uri).schema_arrow.names
        table = read_slice(piece, config.columns_to_read(names))
        rows = slice_rows(piece, table, settings, img2dataset_status)
        mapped = {config.image_column, config.caption_column, config.url_column, "original_width", "original_height"}
        extras = table_columns(table, config.extra_columns, RESERVED, mapped)
        parts.append(build_table(rows, TABLE_SCHEMA, extras))
    out = _concat(parts) if parts else TABLE_SCHEMA.empty_table()
    extra = {
        "rows_read": out.num_rows,
        "image_bytes": sum(len(v) for v in out["image"].to_pylist() if v is not None) if out.num_rows else 0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return ShardOutput(out, extra)


def _concat(parts: list[pa.Table]) -> pa.Table:
    if len(parts) == 1:
        return parts[0]
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # files whose extra columns disagree on a type: keep those as text
        return pa.concat_tables([_extras_as_text(p) for p in parts], promote_options="permissive")


def _extras_as_text(table: pa.Table) -> pa.Table:
    columns = {}
    for name in table.column_names:
        column = table[name]
        if name in RESERVED or pa.types.is_string(column.type):
            columns[name] = column
        else:
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string()
            )
    return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(
        [table.schema.field(n) if n in RESERVED else pa.field(n, pa.string()) for n in columns]))  # fmt: skip


def describe(config: ParquetConfig) -> str:
    return (
        f"{', '.join(config.path)} (image column {config.image_column!r}, caption column {config.caption_column!r}; "
        f"{config.shard_size:,} rows per shard at most, whole row groups)"
    )


SPEC = StageSpec(
    kind="parquet",
    config=ParquetConfig,
    summary="Parquet tables with image bytes (img2dataset, Hugging Face datasets) into image shards",
    schema=TABLE_SCHEMA,
    plan=plan,
    process=process,
    describe_inputs=describe,
    task_rows=task_rows,
)
