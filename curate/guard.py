"""What runs around a stage's shard work so that a run can be trusted on a cluster: the record of shard starts
(curate.attempts: a shard whose worker keeps dying fails after bounded retries), the stall watchdog
(curate.watchdog), and a clean stop on SIGINT / SIGTERM or a stall (curate.interrupt): the stage's workers gone
before its temporaries are removed, what was interrupted named, the record cleared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from curate import attempts, fit, interrupt, storage
from curate.config import Pipeline, StageConfig
from curate.runfolder import StageDir
from curate.watchdog import Watchdog

TASK_ATTEMPTS = 4  # Ray runs a task whose worker died at most 4 times (max_retries 3, its default for tasks)


@dataclass
class StageGuard:
    ledger: attempts.Ledger  # the record of shard starts, handed to the workers
    retries: int  # ray.shard_retries, capped for task stages so the last start Ray allows reports the failure
    watchdog: Watchdog

    def tick(self) -> None:
        self.watchdog.tick()

    def missing(self, shard: int, stage: str) -> str:
        """Why a shard without a result has none: its starts and its workers' deaths, as recorded."""
        try:
            starts = self.ledger.history(shard)
        except Exception:
            starts = []
        why = f":\n{attempts.describe_starts(starts)}" if starts else " (see Ray's log above)"
        return f"stage {stage!r}, shard {shard}: Ray gave up on its task after {len(starts)} start(s){why}"


def remove_all_temporaries(stage_uri: str) -> None:
    """`.tmp-*` leftovers in a stage folder and in the folders its workers write into (markers, a global step)."""
    for folder in (stage_uri, storage.join(stage_uri, "_shards")):
        storage.remove_temporaries(folder)
    for entry in storage.list_files(storage.join(stage_uri, "_global"), pattern="*.tmp-*"):
        if entry.relative.rsplit("/", 1)[-1].startswith(".tmp-"):
            fs, path = storage.resolve(entry.uri)
            fs.delete_file(path)


@contextlib.contextmanager
def guarded(
    pipeline: Pipeline,
    stage: StageConfig,
    stage_dir: StageDir,
    shards: int,
    actors: bool,
    log: Callable[[str], None],
) -> Iterator[StageGuard]:
    settings = pipeline.ray
    retries = settings.shard_retries if actors else min(settings.shard_retries, TASK_ATTEMPTS - 2)
    watchdog = Watchdog(
        stage.stage_name,
        fit.request_of(stage.resources),
        lambda cluster: fit.stage_problems(pipeline, stage, cluster),
        settings.stall_timeout_s,
        settings.wait_for_autoscaler,
        log,
    )
    ledger = attempts.Ledger.new(stage.stage_name)
    try:
        with watchdog:
            yield StageGuard(ledger, retries, watchdog)
    except interrupt.Interrupted as stop:
        still = attempts.wait_stopped(ledger, stage.stage_name)  # Ray kills the stage's workers asynchronously
        if still:
            log(f"[{stage.stage_name}] workers on shards {still} were still running; their leftovers go on resume")
        remove_all_temporaries(stage_dir.uri)
        done = len(stage_dir.done_shards())  # markers on disk: results may not have reached the driver yet
        stop.where = f"stage {stage.stage_name!r} ({done} of {shards} shards done, kept)"
        raise
    finally:
        with contextlib.suppress(Exception):  # a lost GCS connection leaves a few small keys behind
            ledger.clear()
