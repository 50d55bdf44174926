"""`download` source: URL lists (Parquet/CSV/TSV/JSONL, local or remote) into image shards.

img2dataset downloads and resizes (curate.download.fetch); this module plans shards as row ranges of
the URL lists and turns img2dataset's results into image-shard rows: exactly one row per input row,
in input order, with status `ok` or the reason it failed. docs/download.md describes the behaviour,
docs/schema.md the columns and statuses.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from curate import storage
from curate.config import StageConfig, Uris
from curate.download import inputs
from curate.download.fetch import FetchSettings, Result, fetch
from curate.download.net import parse_networks
from curate.download.robots import CACHE as ROBOTS_CACHE
from curate.images import DEFAULT_MAX_PIXELS
from curate.runfolder import ShardTask, StageDir
from curate.schema import IMAGE_SCHEMA, make_key
from curate.stages.spec import ShardOutput, StageSpec, WorkContext

# Columns the download stage adds after the image-shard columns: where each row came from.
SOURCE_FIELDS = [pa.field("source", pa.string(), nullable=False), pa.field("source_row", pa.int64(), nullable=False)]
DOWNLOAD_SCHEMA = pa.schema([*IMAGE_SCHEMA, *SOURCE_FIELDS])
RESERVED = set(DOWNLOAD_SCHEMA.names)
EXTRA_PREFIX = "input_"  # an input column whose name is taken by a fixed column is carried as input_<name>

_INTERPOLATIONS = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]
_FORMAT_MAGIC = ((b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"RIFF", "WEBP"))


class DownloadConfig(StageConfig):
    kind: Literal["download"]
    is_source: ClassVar[bool] = True

    # -- input
    urls: Uris = Field(min_length=1, description="URL list files or globs (local paths or s3://...)")
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str | None = "caption"
    extra_columns: Literal["all", "none"] | tuple[str, ...] = "all"  # input columns carried into the shards
    shard_size: PositiveInt = 10_000

    # -- img2dataset's resizing and encoding
    image_size: PositiveInt = 256
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: _INTERPOLATIONS = "lanczos"
    downscale_interpolation: _INTERPOLATIONS = "area"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: NonNegativeInt = 95
    skip_reencode: bool = False
    min_image_size: NonNegativeInt = 0
    max_aspect_ratio: PositiveFloat | None = None  # None: no limit
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS

    # -- network
    timeout: PositiveFloat = 10.0  # seconds per URL, first byte to last, redirects included
    retries: NonNegativeInt = 0
    thread_count: PositiveInt = 64  # concurrent downloads per worker; a throughput knob, may change on resume
    user_agent_token: str | None = "img2dataset"
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    respect_robots_txt: bool = True
    max_response_bytes: PositiveInt = 32 << 20
    allow_private_addresses: tuple[str, ...] = ()  # CIDRs or IPs exempt from the private-address block

    @field_validator("allow_private_addresses")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                parse_networks([entry])
            except ValueError as e:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network ({e})") from None
        return value

    @field_validator("disallowed_header_directives")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().lower() for v in value)

    @model_validator(mode="after")
    def _quality(self) -> DownloadConfig:
        limit = 9 if self.encode_format == "png" else 100
        if self.encode_quality > limit:
            raise ValueError(f"encode_quality must be 0..{limit} for {self.encode_format} (got {self.encode_quality})")
        if self.caption_column is not None and self.caption_column == self.url_column:
            raise ValueError("url_column and caption_column must differ")
        return self

    def fingerprint(self) -> str:
        """thread_count only changes speed, so a run may be resumed with another value."""
        data = self.model_dump(exclude={"resources", "name", "thread_count"}, mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def needed_columns(self) -> list[str]:
        return [self.url_column] + ([self.caption_column] if self.caption_column else [])

    def column_problems(self, uri: str, names: list[str]) -> list[tuple[tuple[Any, ...], str]]:
        problems: list[tuple[tuple[Any, ...], str]] = []
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        for field in ("url_column", "caption_column"):
            column = getattr(self, field)
            if column is not None and column not in names:
                problems.append(((field,), f"no column {column!r} in {uri} (columns: {shown})"))
        if isinstance(self.extra_columns, tuple):
            missing = [c for c in self.extra_columns if c not in names]
            if missing:
                problems.append((("extra_columns",), f"no column {', '.join(map(repr, missing))} in {uri}"))
        return problems

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Local files only (exist, format known, columns present); remote URIs are checked when planning."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        import importlib.util

        needed = ["img2dataset"] + (["protego"] if self.respect_robots_txt else [])
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            problems.append(((), f"needs {', '.join(missing)}: pip install 'curate[download]'"))
        for i, entry in enumerate(self.urls):
            if storage.has_scheme(entry) and not entry.startswith("file://"):
                continue
            try:
                files = inputs.expand([entry])
            except FileNotFoundError as e:
                problems.append((("urls", i), str(e)))
                continue
            for uri in files[:100]:
                if not storage.exists(uri):
                    problems.append((("urls", i), f"no such file: {uri}"))
                    continue
                try:
                    fmt = inputs.detect_format(uri, self.input_format)
                    problems += self.column_problems(uri, inputs.column_names(uri, fmt))
                except Exception as e:
                    problems.append((("urls", i), f"cannot read {uri}: {e}"))
        return problems

    def fetch_settings(self) -> FetchSettings:
        return FetchSettings(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            upscale_interpolation=self.upscale_interpolation,
            downscale_interpolation=self.downscale_interpolation,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            skip_reencode=self.skip_reencode,
            min_image_size=self.min_image_size,
            max_aspect_ratio=self.max_aspect_ratio if self.max_aspect_ratio is not None else float("inf"),
            max_pixels=self.max_pixels,
            timeout=self.timeout,
            retries=self.retries,
            thread_count=self.thread_count,
            user_agent_token=self.user_agent_token,
            disallowed_header_directives=self.disallowed_header_directives,
            respect_robots_txt=self.respect_robots_txt,
            max_response_bytes=self.max_response_bytes,
            allow_private_addresses=self.allow_private_addresses,
        )


# ---------------------------------------------------------------------------------------------------- plan


def plan(config: DownloadConfig, upstream: StageDir | None) -> list[ShardTask]:
    """Row counts of every URL list (footers for Parquet), cut into shards of `shard_size` rows."""
    counts = []
    for uri in inputs.expand(config.urls):
        fmt = inputs.detect_format(uri, config.input_format)
        problems = config.column_problems(uri, inputs.column_names(uri, fmt))
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        counts.append((uri, inputs.count_rows(uri, fmt)))
    shards = inputs.pack(counts, config.shard_size)
    return [ShardTask(i, tuple(r.encode() for r in ranges)) for i, ranges in enumerate(shards)]


def task_rows(config: DownloadConfig, task: ShardTask) -> int:
    return sum(inputs.RowRange.decode(item).rows for item in task.inputs)


# ---------------------------------------------------------------------------------------------------- process


def _read_task(config: DownloadConfig, task: ShardTask) -> pa.Table:
    """The shard's input rows as url, caption, source, source_row and the carried extra columns."""
    parts = []
    for item in task.inputs:
        rows = inputs.RowRange.decode(item)
        fmt = inputs.detect_format(rows.uri, config.input_format)
        if config.extra_columns == "all":
            columns = None
        elif config.extra_columns == "none":
            columns = config.needed_columns()
        else:
            columns = list(dict.fromkeys([*config.needed_columns(), *config.extra_columns]))
        table = inputs.read_rows(rows.uri, fmt, rows.start, rows.end, columns)
        if table.num_rows != rows.rows:
            raise ValueError(f"{rows.uri} has {table.num_rows} rows in {rows.start}:{rows.end}; was it changed?")
        parts.append(_normalise(config, table, rows))
    if len(parts) == 1:
        return parts[0]
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # lists whose extra columns disagree on a type (an id as int here, as text there): keep them as text
        return pa.concat_tables([_extras_as_text(p) for p in parts], promote_options="permissive")


def _extras_as_text(table: pa.Table) -> pa.Table:
    columns = {}
    for name in table.column_names:
        column = table[name]
        if name in ("url", "caption", "source", "source_row") or pa.types.is_string(column.type):
            columns[name] = column
            continue
        try:
            columns[name] = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = column.to_pylist()
            columns[name] = pa.array([None if v is None else json.dumps(v, default=str) for v in values], pa.string())
    return pa.table(columns)


def _normalise(config: DownloadConfig, table: pa.Table, rows: inputs.RowRange) -> pa.Table:
    url = pc.cast(table[config.url_column], pa.string())
    caption = (
        pc.cast(table[config.caption_column], pa.string())
        if config.caption_column
        else pa.nulls(table.num_rows, pa.string())
    )
    columns: dict[str, Any] = {
        "url": url,
        "caption": caption,
        "source": pa.array([rows.uri] * table.num_rows, pa.string()),
        "source_row": pa.array(range(rows.start, rows.end), pa.int64()),
    }
    if config.extra_columns != "none":
        for name in table.column_names:
            if name in (config.url_column, config.caption_column):
                continue
            columns[EXTRA_PREFIX + name if name in RESERVED else name] = table[name]
    return pa.table(columns)


def row_keys(urls: list[str | None], first_row: int) -> list[str]:
    """make_key("<url>#<n>"), n the row's index in the stage's input (all URL lists in plan order).

    Unique across the whole stage even when a list repeats a URL (LAION does, with other captions),
    so global stages (dedup) can use it as an id; stable as long as the lists and their order are."""
    return [make_key(f"{url or ''}#{first_row + i}") for i, url in enumerate(urls)]


def _image_format(data: bytes | None) -> str | None:
    if data is None:
        return None
    for magic, name in _FORMAT_MAGIC:
        if data.startswith(magic):
            return name
    return None


def process(config: DownloadConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    import img2dataset.downloader  # noqa: F401  (imported once per worker, outside the shard's timing)

    started = time.perf_counter()
    started_at = time.time()
    table = _read_task(config, task)
    urls: list[str | None] = table["url"].to_pylist()
    usable = [i for i, u in enumerate(urls) if u is not None and u.strip()]
    robots_before = ROBOTS_CACHE.fetches
    fetched, network = fetch([urls[i] for i in usable], config.fetch_settings())
    results: list[Result] = [Result("bad_url", "empty URL")] * len(urls)
    for i, result in zip(usable, fetched, strict=True):
        results[i] = result
    seconds = time.perf_counter() - started

    n = len(results)
    image_columns = {
        "key": pa.array(row_keys(urls, task.index * config.shard_size), pa.string()),
        "url": table["url"],
        "caption": table["caption"],
        "image": pa.array([r.image for r in results], pa.binary()),
        "format": pa.array([_image_format(r.image) for r in results], pa.string()),
        "width": pa.array([r.width for r in results], pa.int32()),
        "height": pa.array([r.height for r in results], pa.int32()),
        "original_width": pa.array([r.original_width for r in results], pa.int32()),
        "original_height": pa.array([r.original_height for r in results], pa.int32()),
        "sha256": pa.array([r.sha256 for r in results], pa.string()),
        "status": pa.array([r.status for r in results], pa.string()),
        "error": pa.array([r.error for r in results], pa.string()),
    }
    fixed = pa.table(image_columns, schema=IMAGE_SCHEMA)
    out = fixed
    for name in table.column_names[2:]:  # source, source_row, then the carried columns
        column = table[name]
        field = DOWNLOAD_SCHEMA.field(name) if name in RESERVED else pa.field(name, column.type)
        out = out.append_column(field, column)
    ok = sum(1 for r in results if r.status == "ok")
    extra = {
        "urls": n,
        "ok": ok,
        "download_seconds": round(seconds, 3),
        "bytes_received": network["bytes_received"],
        "connections": network["connections"],
        "image_bytes": sum(len(r.image) for r in results if r.image is not None),
        "robots_fetches": ROBOTS_CACHE.fetches - robots_before,
        "rates": {
            "success_rate": round(ok / n, 4) if n else 0.0,
            "images_per_second": round(ok / seconds, 2) if seconds > 0 else None,
            "urls_per_second": round(n / seconds, 2) if seconds > 0 else None,
        },
        "span": {"started_at": round(started_at, 3), "finished_at": round(time.time(), 3)},  # epoch seconds
    }
    return ShardOutput(out, extra)


def describe(config: DownloadConfig) -> str:
    where = ", ".join(config.urls)
    return (
        f"{where} ({config.input_format}; url column {config.url_column!r}, caption column "
        f"{config.caption_column!r}; {config.shard_size:,} rows per shard; resize {config.resize_mode} "
        f"{config.image_size}, {config.encode_format}; {config.thread_count} threads per worker)"
    )


SPEC = StageSpec(
    kind="download",
    config=DownloadConfig,
    summary="URL lists downloaded with img2dataset into image shards, one row per URL",
    schema=DOWNLOAD_SCHEMA,
    plan=plan,
    process=process,
    describe_inputs=describe,
    task_rows=task_rows,
)
