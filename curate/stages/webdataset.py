"""`webdataset` source: WebDataset tar shards (an img2dataset download, local or on an object store) into
image shards, one output shard per tar (or per part of a large tar), every member accounted for.

The reading is curate.ingest (tars, tar_plan, webdataset); docs/sources.md describes the behaviour and
docs/schema.md#webdataset the columns.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator

from curate import storage
from curate.config import StageConfig, Uris
from curate.download.statuses import classify
from curate.images import DEFAULT_MAX_PIXELS
from curate.ingest.rows import ExtraColumns, build_table, extra_columns
from curate.ingest.tar_plan import TarPart, plan_tars, sizes
from curate.ingest.webdataset import TarSettings, read_part
from curate.runfolder import ShardTask, StageDir
from curate.schema import WEBDATASET_SCHEMA
from curate.stages.spec import ShardOutput, StageSpec, WorkContext

RESERVED = set(WEBDATASET_SCHEMA.names)


class WebDatasetConfig(StageConfig):
    kind: Literal["webdataset"]
    is_source: ClassVar[bool] = True

    path: Uris = Field(
        min_length=1, description="tar files, globs or brace lists (s3://bucket/laion/{00000..00099}.tar)"
    )
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption: Literal["txt", "json", "none"] = "txt"  # the .txt member, a field of the .json member, or none
    caption_field: str = "caption"  # with caption: json
    url_field: str = "url"  # the .json field with the sample's source URL (img2dataset's `url`)
    extra_columns: ExtraColumns = "all"  # .json fields carried as columns: all | none | [names]
    img2dataset_sidecar: bool = True  # rows for the URLs img2dataset failed, from the .parquet beside each tar
    max_part_bytes: PositiveInt = 1 << 30  # a larger plain .tar is read as several shards
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    threads: PositiveInt = 4  # images decoded at once inside one worker

    @field_validator("image_extensions")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower().lstrip(".") for e in value)

    def fingerprint(self) -> str:
        """threads only change speed, so a run may be resumed with another value."""
        import hashlib
        import json

        data = self.model_dump(exclude={"resources", "name", "threads"}, mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Local tars must exist; remote ones (s3://, gs://) are listed when the stage plans."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        for i, entry in enumerate(self.path):
            if not storage.is_local(entry):
                continue
            try:
                sizes(storage.expand([entry]))
            except (FileNotFoundError, OSError) as e:
                problems.append((("path", i), str(e)))
        return problems

    def settings(self) -> TarSettings:
        return TarSettings(
            image_extensions=self.image_extensions,
            caption=self.caption,
            caption_field=self.caption_field,
            url_field=self.url_field,
            max_pixels=self.max_pixels,
            threads=self.threads,
            sidecar=self.img2dataset_sidecar,
        )

    def mapped_fields(self) -> set[str]:
        """JSON fields already used for fixed columns, not repeated as extra columns."""
        return {self.url_field, "original_width", "original_height"} | (
            {self.caption_field} if self.caption == "json" else set()
        )


def plan(config: WebDatasetConfig, upstream: StageDir | None) -> list[ShardTask]:
    tars = list(dict.fromkeys(storage.expand(config.path)))  # a tar matched twice is read once (keys stay unique)
    parts = plan_tars(tars, config.max_part_bytes)
    return [ShardTask(i, (part.encode(),)) for i, part in enumerate(parts)]


def img2dataset_status(status: str, message: str) -> str:
    """img2dataset's failed rows get the download stage's statuses (http_404, timeout, ...)."""
    return classify(message, "resize" if status == "failed_to_resize" else "download")


def process(config: WebDatasetConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    started = time.perf_counter()
    (item,) = task.inputs
    result = read_part(TarPart.decode(item), config.settings(), img2dataset_status)
    extras = extra_columns(result.metadata, config.extra_columns, RESERVED, config.mapped_fields())
    table = build_table(result.rows, WEBDATASET_SCHEMA, extras)
    extra = {**result.counters, "seconds": round(time.perf_counter() - started, 3)}
    return ShardOutput(table, extra)


def task_rows(config: WebDatasetConfig, task: ShardTask) -> int:
    return 0  # not known before the tar is read: progress counts shards


def describe(config: WebDatasetConfig) -> str:
    caption = f"json field {config.caption_field!r}" if config.caption == "json" else config.caption
    return (
        f"{', '.join(config.path)} (images {', '.join(config.image_extensions)}; captions: {caption}; "
        f"one shard per tar, parts of {config.max_part_bytes / 2**20:,.0f} MiB for larger ones)"
    )


SPEC = StageSpec(
    kind="webdataset",
    config=WebDatasetConfig,
    summary="WebDataset tars (an img2dataset download) into image shards, every member accounted for",
    schema=WEBDATASET_SCHEMA,
    plan=plan,
    process=process,
    describe_inputs=describe,
    task_rows=task_rows,
)
