"""What the runner needs to know about a stage kind."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from curate.config import ModelSpec, StageConfig
from curate.runfolder import ShardTask, StageDir
from curate.steps import GlobalSteps


@dataclass(frozen=True)
class WorkContext:
    """Everything a worker needs besides its shard; plain data so it pickles to Ray workers."""

    run_uri: str
    stage_name: str
    upstream_uri: str | None
    models: dict[str, ModelSpec] = field(default_factory=dict)
    joined_uris: dict[str, str] = field(default_factory=dict)  # joined stage name -> its folder
    services: Any = None  # what the stage's `services` yielded (caption: its inference servers' URLs)

    def upstream_shard(self, index: int) -> str:
        assert self.upstream_uri is not None, "a source stage has no upstream"
        return StageDir(self.upstream_uri).shard(index)

    def joined_shard(self, name: str, index: int) -> str:
        """Shard ``index`` of a joined stage: the same samples as upstream shard ``index``."""
        return StageDir(self.joined_uris[name]).shard(index)


@dataclass(frozen=True)
class ShardOutput:
    """A processed shard and any stage-specific counters to keep in its completion marker."""

    table: pa.Table
    extra: dict[str, Any] = field(default_factory=dict)
    # Optional: row counts of the file's row groups in order (e.g. so no row group spans two buckets),
    # and Parquet writer options replacing curate.schema.parquet_options. None keeps the defaults.
    row_groups: tuple[int, ...] | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: type[StageConfig]
    summary: str  # one line for `curate check`
    schema: pa.Schema
    # (config, upstream stage folder or None) -> shard tasks; called once, on the stage's first run
    plan: Callable[[Any, StageDir | None], list[ShardTask]]
    # (config, task, context, state from setup) -> the output shard
    process: Callable[[Any, ShardTask, WorkContext, Any], ShardOutput]
    # (config, context) -> state loaded once per worker (a model); None makes it a plain task stage
    setup: Callable[[Any, WorkContext], Any] | None = None
    describe_inputs: Callable[[Any], str] = lambda config: ""
    # (config, task) -> rows the shard will have, where that is not one per input (sources) or one per upstream
    # row (transforms): row ranges of URL lists, samples of validate. Progress only.
    task_rows: Callable[[Any, ShardTask], int] | None = None
    # (config, upstream stage folder or None, this stage's folder, context) -> a generator of phases of Ray tasks
    # (curate.steps): a global step, one that needs all of the upstream output at once (dedup's clustering, a
    # filter's top fraction). The runner drives it on the driver before the shard tasks: it runs each phase's
    # tasks as Ray tasks with the stage's resources (at most `concurrency` at once), each writing its marker
    # under `StageDir.global_uri`, sends the results back into the generator, and once it returns writes
    # `global_marker_uri` with the summary it returned, so a resume skips the step, and a resume inside it
    # skips every task with a marker. Results of the step go under `StageDir.global_uri`.
    global_step: Callable[[Any, StageDir | None, StageDir, WorkContext], GlobalSteps] | None = None
    # (config) -> whether this config needs the global step (filter needs it only for a top fraction)
    global_when: Callable[[Any], bool] = lambda config: True
    # (config, upstream stage folder or None, this stage's folder, context) -> summary: a closing step over the
    # stage's whole output (filter's report). The runner runs it as a Ray task with the stage's resources once
    # every shard has its marker and before `_SUCCESS.json`, which keeps its summary under "finish"; a stage
    # whose closing step failed is not complete, so a re-run retries only that step.
    finish: Callable[[Any, StageDir | None, StageDir, WorkContext], dict[str, Any]] | None = None
    # (config, context, log) -> a context manager around the stage's shard work (caption's inference servers,
    # started before the first shard and stopped after the last or when the run stops); what it yields reaches
    # every worker as `WorkContext.services`
    services: Callable[[Any, WorkContext, Callable[[str], None]], AbstractContextManager[Any]] | None = None
    # whether shard i is made from upstream shard i alone (keys and rows equal), as `one_task_per_upstream_shard`
    # plans, for a plan that checks more before it returns those tasks (filter's prompt files): `curate verify`
    # repairs such a stage shard by shard
    one_to_one: bool = False


def one_task_per_upstream_shard(config: Any, upstream: StageDir | None) -> list[ShardTask]:
    """The plan of a transform stage: output shard i is made from upstream shard i."""
    assert upstream is not None
    return [ShardTask(i, (upstream.shard(i),)) for i in sorted(upstream.done_shards())]
