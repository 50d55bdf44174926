"""Image-shard rows from bytes a source found: decoded once to check and measure them (curate.images' rules),
stored unchanged, and metadata turned into extra columns the way the `download` stage carries list columns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa

from curate.images import ImageError, open_image

EXTRA_PREFIX = "input_"  # a metadata field whose name is taken by a fixed column is carried as input_<name>
ExtraColumns = Literal["all", "none"] | tuple[str, ...]


def check_image(data: bytes | None, max_pixels: int) -> dict[str, Any]:
    """The image columns of one sample: `ok` with format and size, or the decode failure's status."""
    if data is None:
        return {"status": "no_image", "error": "no image", "image": None}
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        decoded = open_image(data, max_pixels)
    except ImageError as e:
        return {"status": e.status, "error": e.message, "image": None, "sha256": sha256}
    width, height = decoded.image.size
    return {
        "image": data,
        "format": decoded.format,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "sha256": sha256,
        "status": "ok",
        "error": None,
    }


def extra_columns(
    records: Sequence[dict[str, Any] | None], select: ExtraColumns, reserved: set[str], skip: set[str] = frozenset()
) -> dict[str, pa.Array]:
    """Per-row metadata (JSON objects, sidecar rows) as columns, in order of first appearance.

    ``select``: all fields, none, or the named ones (null where a row lacks them). ``skip``: fields already
    used for fixed columns. A field named like a fixed column becomes ``input_<name>``. Types are inferred by
    pyarrow; a field whose values do not share one type is carried as JSON text."""
    if select == "none":
        return {}
    if select == "all":
        names: dict[str, None] = {}
        for record in records:
            if record:
                names.update(dict.fromkeys(k for k in record if k not in skip))
    else:
        names = dict.fromkeys(select)
    columns: dict[str, pa.Array] = {}
    for name in names:
        values = [None if record is None else record.get(name) for record in records]
        columns[EXTRA_PREFIX + name if name in reserved else name] = _array(values)
    return columns


def table_columns(
    table: pa.Table, select: ExtraColumns, reserved: set[str], skip: set[str | None]
) -> dict[str, pa.ChunkedArray]:
    """A table's own columns carried as they are (their Arrow types kept), except ``skip``; a name taken by a
    fixed column becomes ``input_<name>``."""
    if select == "none":
        return {}
    wanted = table.column_names if select == "all" else [n for n in select if n in table.column_names]
    return {EXTRA_PREFIX + n if n in reserved else n: table[n] for n in wanted if n not in skip}


def _array(values: list[Any]) -> pa.Array:
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values], pa.string())
    return array if not pa.types.is_null(array.type) else pa.array(values, pa.string())


def build_table(rows: list[dict[str, Any]], fixed: pa.Schema, extras: dict[str, pa.Array]) -> pa.Table:
    """Fixed columns (a schema's fields, missing values null) followed by the extra columns."""
    table = pa.Table.from_pylist(rows, schema=fixed) if rows else fixed.empty_table()
    for name, column in extras.items():
        table = table.append_column(pa.field(name, column.type), column)
    return table
