"""URL lists: Parquet, CSV, TSV or JSONL files (optionally .gz/.bz2/.zst compressed), local or remote.

A shard is a list of row ranges written ``<file uri>#<start>:<end>`` (end exclusive), so the plan is
small and exact: a resumed run reads exactly the rows the first run planned. Row counts come from
Parquet footers; CSV/TSV/JSONL are counted by reading them once with pyarrow.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from curate import storage

FORMATS = ("parquet", "csv", "tsv", "jsonl")
_COMPRESSION = (".gz", ".bz2", ".zst", ".lz4")


def detect_format(uri: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = uri.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    ext = posixpath.splitext(name)[1].lstrip(".")
    if ext in ("parquet", "pq"):
        return "parquet"
    if ext in ("csv", "tsv"):
        return ext
    if ext in ("jsonl", "ndjson", "json"):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {uri} from its name; set input_format")


def expand(patterns: Iterable[str]) -> list[str]:
    """Files named or matched (brace lists, then globs, each glob's matches sorted), in the order given."""
    return storage.expand(list(patterns))


def _open_text(uri: str):
    fs, path = storage.resolve(uri)
    return fs.open_input_stream(path)  # pyarrow detects compression from the extension


def column_names(uri: str, fmt: str) -> list[str]:
    """Cheap: a Parquet footer, or the first line of a CSV/TSV/JSONL file."""
    if fmt == "parquet":
        return storage.parquet_file(uri).schema_arrow.names
    with _open_text(uri) as stream:
        first = b""
        while not first.endswith(b"\n"):
            chunk = stream.read(65536)
            if not chunk:
                break
            first += chunk
            if len(first) > 16 << 20:
                break
    line = first.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    if fmt == "jsonl":
        return list(json.loads(line)) if line.strip() else []
    return next(csv.reader(io.StringIO(line), delimiter="\t" if fmt == "tsv" else ","), [])


def count_rows(uri: str, fmt: str) -> int:
    if fmt == "parquet":
        return storage.parquet_file(uri).metadata.num_rows
    return _read_text_table(uri, fmt).num_rows


@functools.lru_cache(maxsize=1)
def _read_text_table(uri: str, fmt: str) -> pa.Table:
    """A whole CSV/TSV/JSONL file (kept for the next shard of the same file in this worker process).

    CSV/TSV columns are read as strings: CSV has no types, and inference from the first block fails
    on the mixed columns web-scraped lists have."""
    if fmt == "jsonl":
        import pyarrow.json as pajson

        with _open_text(uri) as stream:
            return pajson.read_json(stream)
    import pyarrow.csv as pacsv

    delimiter = "\t" if fmt == "tsv" else ","
    names = column_names(uri, fmt)
    with _open_text(uri) as stream:
        return pacsv.read_csv(
            stream,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )


def read_rows(uri: str, fmt: str, start: int, end: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, end) of one file."""
    if fmt == "parquet":
        file = storage.parquet_file(uri)
        groups, offset, first = [], 0, None
        for i in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(i).num_rows
            if offset + rows > start and offset < end:
                groups.append(i)
                first = offset if first is None else first
            offset += rows
        if not groups:
            return file.schema_arrow.empty_table().select(columns) if columns else file.schema_arrow.empty_table()
        table = file.read_row_groups(groups, columns=columns)
        return table.slice(start - first, end - start)
    table = _read_text_table(uri, fmt)
    table = table.select(columns) if columns else table
    return table.slice(start, end - start)


@dataclass(frozen=True)
class RowRange:
    uri: str
    start: int
    end: int

    def encode(self) -> str:
        return f"{self.uri}#{self.start}:{self.end}"

    @staticmethod
    def decode(text: str) -> RowRange:
        uri, span = text.rsplit("#", 1)
        start, end = span.split(":")
        return RowRange(uri, int(start), int(end))

    @property
    def rows(self) -> int:
        return self.end - self.start


def pack(counts: list[tuple[str, int]], shard_size: int) -> list[list[RowRange]]:
    """Cut files into shards of exactly ``shard_size`` rows (the last may be smaller); a shard may take
    rows from several small files."""
    shards: list[list[RowRange]] = []
    current: list[RowRange] = []
    filled = 0
    for uri, total in counts:
        start = 0
        while start < total:
            take = min(shard_size - filled, total - start)
            current.append(RowRange(uri, start, start + take))
            start += take
            filled += take
            if filled == shard_size:
                shards.append(current)
                current, filled = [], 0
    if current:
        shards.append(current)
    return shards
