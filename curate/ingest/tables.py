"""Parquet tables that hold images: a binary column of encoded bytes (img2dataset's `output_format:
parquet`, where the column is named after its encode format, `jpg`), or Hugging Face datasets' `Image`
feature, a `struct<bytes: binary, path: string>` whose bytes may be null when the path names a file.

Planning reads only footers and cuts the tables into shards of whole row groups (a row group is the
unit Parquet reads), packed up to a row budget, so no row group is read by two shards.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curate import storage
from curate.ingest.rows import check_image
from curate.schema import make_key


@dataclass(frozen=True)
class TableSlice:
    """Row groups [first_group, end_group) of one file: rows [start, start + rows) of it."""

    uri: str
    first_group: int
    end_group: int
    start: int
    rows: int

    def encode(self) -> str:
        return json.dumps(
            {"file": self.uri, "row_groups": [self.first_group, self.end_group], "rows": [self.start, self.rows]},
            separators=(",", ":"),
        )

    @staticmethod
    def decode(text: str) -> TableSlice:
        data = json.loads(text)
        return TableSlice(data["file"], *data["row_groups"], *data["rows"])


def image_column_problem(field: pa.Field) -> str | None:
    """None when the column holds images this module reads, else why not."""
    kind = field.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return None
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return None
    return f"column {field.name!r} is {kind}; expected binary image bytes or a struct<bytes, path> (Hugging Face Image)"


def row_groups(uri: str) -> list[int]:
    metadata = storage.parquet_file(uri).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def pack(files: list[tuple[str, list[int]]], shard_rows: int) -> list[list[TableSlice]]:
    """Consecutive row groups into shards of at most ``shard_rows`` rows (a larger row group is a shard of
    its own); a shard may take row groups of several small files."""
    shards: list[list[TableSlice]] = []
    current: list[TableSlice] = []
    filled = 0
    for uri, groups in files:
        start_group, start_row, row = 0, 0, 0
        for i, rows in enumerate(groups):
            if filled and filled + rows > shard_rows:
                if i > start_group:
                    current.append(TableSlice(uri, start_group, i, start_row, row - start_row))
                shards.append(current)
                current, filled, start_group, start_row = [], 0, i, row
            filled += rows
            row += rows
        if len(groups) > start_group:
            current.append(TableSlice(uri, start_group, len(groups), start_row, row - start_row))
    if current:
        shards.append(current)
    return shards


def read_slice(piece: TableSlice, columns: list[str] | None) -> pa.Table:
    file = storage.parquet_file(piece.uri)
    table = file.read_row_groups(list(range(piece.first_group, piece.end_group)), columns=columns)
    if table.num_rows != piece.rows:
        raise ValueError(f"{piece.uri} has {table.num_rows} rows in row groups {piece.first_group}:{piece.end_group} "
                         f"where the plan found {piece.rows}; was it changed?")  # fmt: skip
    return table


def image_values(column: pa.ChunkedArray, table_uri: str) -> list[tuple[bytes | None, str | None]]:
    """(bytes, None) per row, or (None, why there are none). A struct with null bytes and a path reads the
    file at the path (absolute, or relative to the table's folder)."""
    if not pa.types.is_struct(column.type):
        return [(v, None if v is not None else "the image cell is null") for v in column.to_pylist()]
    out: list[tuple[bytes | None, str | None]] = []
    for cell in column.to_pylist():
        if cell is None:
            out.append((None, "the image cell is null"))
        elif cell.get("bytes") is not None:
            out.append((cell["bytes"], None))
        elif cell.get("path"):
            out.append(_read_path(str(cell["path"]), table_uri))
        else:
            out.append((None, "the image struct has neither bytes nor a path"))
    return out


def _read_path(path: str, table_uri: str) -> tuple[bytes | None, str | None]:
    uri = path if storage.has_scheme(path) or path.startswith("/") else storage.join(posixpath.dirname(table_uri), path)
    try:
        return storage.read_bytes(uri), None
    except OSError as e:
        return None, f"read_error: {uri}: {type(e).__name__}: {e}"


@dataclass(frozen=True)
class TableSettings:
    image_column: str = "image"
    caption_column: str | None = "caption"
    url_column: str | None = None
    max_pixels: int = 89_478_485
    threads: int = 4
    # img2dataset's Parquet output: rows whose image is null carry its `status` / `error_message`
    status_column: str = "status"
    error_column: str = "error_message"


def slice_rows(
    piece: TableSlice, table: pa.Table, settings: TableSettings, classify: Callable[[str, str], str]
) -> list[dict[str, Any]]:
    """The fixed columns of every row of one slice, in table order."""
    values = image_values(table[settings.image_column], piece.uri)
    with ThreadPoolExecutor(max(1, settings.threads)) as pool:
        checked = list(pool.map(lambda v: check_image(v[0], settings.max_pixels) if v[0] is not None else None, values))
    captions = _strings(table, settings.caption_column)
    urls = _strings(table, settings.url_column)
    failures = _img2dataset_failures(table, settings)
    originals = list(zip(_ints(table, "original_width"), _ints(table, "original_height"), strict=True))
    rows = []
    for i, ((_, problem), image) in enumerate(zip(values, checked, strict=True)):
        source_row = piece.start + i
        row: dict[str, Any] = {
            "key": make_key(f"{piece.uri}#{source_row}"),
            "url": urls[i] if urls[i] is not None else f"{piece.uri}#{source_row}",
            "caption": captions[i],
            "source": piece.uri,
            "source_row": source_row,
        }
        if image is not None:
            row.update(image)
            if image["status"] == "ok" and None not in originals[i]:  # img2dataset's size before its resize
                row["original_width"], row["original_height"] = originals[i]
        elif failures[i] is not None:
            status, message = failures[i]
            row.update(status=classify(status, message), error=message)
        elif problem is not None and problem.startswith("read_error: "):
            row.update(status="read_error", error=problem[len("read_error: ") :])
        else:
            row.update(status="no_image", error=problem)
        rows.append(row)
    return rows


def _strings(table: pa.Table, column: str | None) -> list[str | None]:
    if column is None or column not in table.column_names:
        return [None] * table.num_rows
    return [None if v is None else str(v) for v in table[column].to_pylist()]


def _ints(table: pa.Table, column: str) -> list[int | None]:
    if column not in table.column_names or not pa.types.is_integer(table[column].type):
        return [None] * table.num_rows
    return table[column].to_pylist()


def _img2dataset_failures(table: pa.Table, settings: TableSettings) -> list[tuple[str, str] | None]:
    names = table.column_names
    if settings.status_column not in names or settings.error_column not in names:
        return [None] * table.num_rows
    statuses = table[settings.status_column].to_pylist()
    errors = table[settings.error_column].to_pylist()
    return [
        (str(s), str(e or s)) if s is not None and s != "success" else None
        for s, e in zip(statuses, errors, strict=True)
    ]
