"""docs/schema.md documents every column every stage writes, with the type the code writes."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
from conftest import REPO

from curate.stages import STAGES


def documented_columns(kind: str) -> dict[str, str]:
    text = (REPO / "docs" / "schema.md").read_text()
    match = re.search(rf"^## {re.escape(kind)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/schema.md has no '## {kind}' section"
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+?) \|", match.group(1), re.M)
    return dict(rows)


def readable_type(arrow_type: pa.DataType) -> str:
    """Arrow's name for a type, except the tensor extension, written as fixed_shape_tensor(float16, [512])."""
    if isinstance(arrow_type, pa.FixedShapeTensorType):
        value = np.dtype(arrow_type.value_type.to_pandas_dtype()).name
        return f"fixed_shape_tensor({value}, {list(arrow_type.shape)})"
    return {"halffloat": "float16", "float": "float32", "double": "float64"}.get(str(arrow_type), str(arrow_type))


def test_every_stage_schema_is_documented():
    for kind, spec in STAGES.items():
        documented = {name: kind.removesuffix(", not null") for name, kind in documented_columns(kind).items()}
        written = {field.name: readable_type(field.type) for field in spec.schema}
        assert documented == written, f"docs/schema.md section '{kind}' differs from the code"
