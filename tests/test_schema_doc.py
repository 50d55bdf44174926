"""docs/schema.md documents every column every stage writes, with the type the code writes."""

from __future__ import annotations

import re

from conftest import REPO

from curate.stages import STAGES


def documented_columns(kind: str) -> dict[str, str]:
    text = (REPO / "docs" / "schema.md").read_text()
    match = re.search(rf"^## {re.escape(kind)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/schema.md has no '## {kind}' section"
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+?) \|", match.group(1), re.M)
    return dict(rows)


def test_every_stage_schema_is_documented():
    for kind, spec in STAGES.items():
        documented = documented_columns(kind)
        written = {field.name: str(field.type) for field in spec.schema}
        assert documented == written, f"docs/schema.md section '{kind}' differs from the code"
