"""Arrow schemas of the shards each stage writes, and how they are written.

docs/schema.md describes every column; tests/test_schema_doc.py keeps the two in step.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1"

# The image shard: what the `local` source writes today and the `download` stage will write. Later
# stages join on `key`.
IMAGE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

# Sources that read images users already have add where each row came from after the image columns, then
# the input's own metadata columns (docs/schema.md#webdataset, #parquet).
WEBDATASET_SCHEMA = pa.schema(
    [
        *IMAGE_SCHEMA,
        pa.field("source", pa.string(), nullable=False),  # the tar's URI
        pa.field("source_key", pa.string()),  # the WebDataset key inside the tar (img2dataset's key)
        pa.field("source_members", pa.list_(pa.string())),  # the tar members this row accounts for
    ]
)
TABLE_SCHEMA = pa.schema(
    [
        *IMAGE_SCHEMA,
        pa.field("source", pa.string(), nullable=False),  # the Parquet file's URI
        pa.field("source_row", pa.int64(), nullable=False),  # the row's index in that file
    ]
)

# Columns that repeat a lot and compress well as dictionaries; float and binary columns must not be
# dictionary-encoded (NOTES.md: it costs time and gains nothing on tensors and JPEG bytes).
DICTIONARY_COLUMNS = ["status", "format", "error"]
UNCOMPRESSED_COLUMNS = ["image"]  # already-compressed bytes: zstd would only cost CPU


def make_key(source_id: str) -> str:
    """A stable sample id from where the sample came from (a URL or a path relative to the input root).

    96 bits of SHA-256: collision odds stay below one in a million at ten billion samples.
    """
    return hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:24]


def parquet_options(table: pa.Table, target_row_group_bytes: int = 64 << 20) -> dict[str, Any]:
    """Writer options: zstd except for incompressible columns, dictionaries only where they pay,
    and row groups of about ``target_row_group_bytes`` so readers can stream a row group at a time."""
    names = table.column_names
    compression = {name: ("none" if name in UNCOMPRESSED_COLUMNS else "zstd") for name in names}
    dictionary = [name for name in names if name in DICTIONARY_COLUMNS or name == "key"]
    rows = max(1, table.num_rows)
    per_row = max(1, table.nbytes // rows)
    return {
        "compression": compression,
        "use_dictionary": dictionary,
        "row_group_size": max(1, min(rows, target_row_group_bytes // per_row)),
    }


# The `sscd` stage: one 512-d SSCD embedding per upstream row, stored as float16 in Arrow's canonical
# fixed-shape tensor type (plain pyarrow gives (N, 512) numpy zero-copy, Ray Data gives an ndarray column).
# Rows that are not `ok` carry an all-zero vector, never null: Ray Data cannot turn a tensor column
# with nulls into numpy.
SSCD_DIMS = 512
SSCD_TYPE = pa.fixed_shape_tensor(pa.float16(), [SSCD_DIMS])
SSCD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("sscd", SSCD_TYPE, nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
    ]
)

# The `dedup` stage: the keep/drop decision for every row of the sscd stage.
DEDUP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("cluster", pa.int32()),  # nearest k-means centroid; -1 when the row has no embedding
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("dup_of", pa.string()),  # key of the kept row this one duplicates; null when kept
        pa.field("similarity", pa.float32()),  # cosine similarity to dup_of (1.0 for exact copies)
        pa.field(
            "reason", pa.string()
        ),  # kept | exact_duplicate | near_duplicate | seen_before | eval_overlap | not_ok
        pa.field("status", pa.string(), nullable=False),  # the sscd row's status (ok or why not)
        pa.field("dup_reference", pa.string()),  # the `against` reference dup_of is in; null within the run
    ]
)

# The `filter` stage: the keep/drop decision of every row of its image stage, the first rule that removed
# it, and the values the rules looked at (so a report or a notebook can ask "what if" without recomputing).
FILTER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("removed_by", pa.string(), nullable=False),  # "" when kept, else the first rule that failed
        pa.field("status", pa.string(), nullable=False),  # ok | filtered | the image row's status
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption_words", pa.int32()),
        pa.field("caption_chars", pa.int32()),
        pa.field("language", pa.string()),
        pa.field("language_prob", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("nsfw", pa.float32()),
        pa.field("watermark", pa.float32()),
        pa.field("matched_prompt", pa.string()),  # exclude_prompts: the prompt the row matched, as written
        pa.field("matched_prompt_file", pa.string()),
        pa.field("matched_prompt_line", pa.int32()),
        pa.field("matched_column", pa.string()),
        pa.field("matched_words", pa.string()),
    ]
)

# The `score` stage: CLIP score and head scores for every row of an image stage (1:1, same order). Scores
# are null where not computed (row not processed, head not configured, no caption for clip_score), so a
# later `filter` can tell "not scored" from any score. `embedding` is the L2-normalised image embedding as a
# variable-length float16 list (its width depends on the CLIP architecture), null unless `keep_embedding`.
SCORE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("nsfw", pa.float32()),
        pa.field("watermark", pa.float32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("embedding", pa.list_(pa.float16())),
    ]
)


def embedding_array(vectors: Any) -> pa.ExtensionArray:
    """(N, 512) float16 numpy -> canonical fixed-shape tensor array."""
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(vectors)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> Any:
    """A fixed-shape tensor column -> (N, *shape) numpy array."""
    import numpy as np

    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            shape = column.type.shape
            return np.zeros((0, *shape), column.type.value_type.to_pandas_dtype())
        column = column.combine_chunks()
    return column.to_numpy_ndarray()
