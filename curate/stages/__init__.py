"""Stage kinds. Each module defines a config class, how to plan shards and how to process one shard.

To add a stage: write a module with a `StageConfig` subclass (with `kind: Literal["..."]`), a `plan`
function, a `process` function (and a `setup` function if it loads a model once per worker), and
register a `StageSpec` here. docs/architecture.md walks through it.
"""

from __future__ import annotations

from curate.stages import caption, dedup, download, encode, filter, local, parquet, score, sscd, validate, webdataset
from curate.stages.spec import StageSpec, WorkContext

STAGES: dict[str, StageSpec] = {
    spec.kind: spec
    for spec in (
        local.SPEC,
        download.SPEC,
        webdataset.SPEC,
        parquet.SPEC,
        filter.SPEC,
        score.SPEC,
        sscd.SPEC,
        dedup.SPEC,
        caption.SPEC,
        encode.SPEC,
        validate.SPEC,
    )
}

__all__ = ["STAGES", "StageSpec", "WorkContext"]
