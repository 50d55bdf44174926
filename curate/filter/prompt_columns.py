"""The captions the prompt rule checks (`prompt_columns`): a column of the image shard (`caption`), or
`<stage>.<column>` of a joined stage's shard (`caption.caption_synthetic`, the synthetic caption), joined on key."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from curate import storage


def split(name: str) -> tuple[str | None, str]:
    """(joined stage or None for the image shard, column). Stage names hold no dots (curate.config)."""
    stage, dot, column = name.partition(".")
    return (stage, column) if dot else (None, name)


def joined_texts(uri: str, column: str, keys: list[str]) -> list[str | None]:
    """A joined shard's text column in the image shard's key order."""
    names = storage.parquet_file(uri).schema_arrow.names
    if column not in names:
        raise ValueError(f"prompt_columns: {uri} has no column {column!r} (columns: {', '.join(names)})")
    table = storage.read_parquet(uri, columns=["key", column])
    where = {k: i for i, k in enumerate(table["key"].to_pylist())}
    values = table[column].to_pylist()
    absent = [k for k in keys if k not in where]
    if absent:
        raise ValueError(f"{len(absent)} keys of the image shard are missing from {uri}, e.g. {absent[0]}")
    return [values[where[k]] for k in keys]


def read_texts(
    table: pa.Table, columns: tuple[str, ...], joined_shard: Callable[[str], str]
) -> dict[str, list[str | None]]:
    """Each named column's texts, in the image shard's row order; ``joined_shard(stage)``: the joined stage's
    shard of the same samples."""
    keys = table["key"].to_pylist()
    texts = {}
    for name in columns:
        stage, column = split(name)
        if stage is None:
            if column not in table.column_names:
                raise ValueError(f"prompt_columns: the image stage has no column {column!r}")
            texts[name] = table[column].to_pylist()
        else:
            texts[name] = joined_texts(joined_shard(stage), column, keys)
    return texts


def column_problem(columns: tuple[str, ...], shard_of: Callable[[str | None], str]) -> str | None:
    """Why a named column is missing from its stage's shard (``shard_of(stage or None)``; footers only), or
    None. A shard that does not exist yet is not checked."""
    for name in columns:
        stage, column = split(name)
        shard = shard_of(stage)
        if not storage.exists(shard):
            continue
        names = storage.parquet_file(shard).schema_arrow.names
        if column not in names:
            return f"{name!r}: {shard} has no column {column!r} (columns: {', '.join(names)})"
    return None
