"""`curate verify`: every finished shard checked against its marker and its upstream, as Ray tasks; what a repair
must redo; and the cheap size check a resume makes.

What is checked, per shard (curate.runfolder.check_shard_file): the file exists, its size and CRC32C match the
marker (every byte read once, in large sequential reads), its footer's row count matches the marker; for a
stage made shard by shard from its upstream (one_task_per_upstream_shard), its set of keys equals the upstream
shard's (the two `key` columns read and sorted: a small part of a shard, and it catches a shard replaced by
another valid file with a marker to match). A complete stage must have a marker for every planned shard.
A digest of the keys in the marker would spare those reads, but sorting 10,000 keys to make it took 2-4 ms
against 15-40 ms for writing such a small-row shard, too much for the write path (bench/verify.py).

What a repair redoes (`repair_plan`), given the damaged shards:
- the damaged shards themselves;
- in a later stage that reads a repaired stage (input or join) shard by shard with no global step: the shards of
  the same indices (they were made from the damaged bytes, or may have been);
- a later stage whose global step reads a repaired stage (dedup's clustering, a filter's top fraction), or whose
  shards are not one per upstream shard (validate): the whole stage, global step included, since any of its
  shards may depend on any upstream row; and so, in turn, every shard of the stages that read it.
Stages are invalidated last-first (markers and `_SUCCESS.json` before files), so a repair killed halfway leaves
the damage where the next `curate verify` finds it again.

Work is split into Ray tasks of up to `SHARDS_PER_TASK` shard indices; a task checks, index by index, the shards
of every stage made from another shard by shard (a lineage: images -> prefilter -> encode), upstream first, so
the key columns it compares are read from the page cache just after their files were streamed, instead of
from the disk again (cold, those small reads cost 40-90 ms a shard pair on this project's VMs, half the time
of streaming a 200 MB encode shard). Each task reads its markers and files with memory of about one read chunk
(8 MiB) and one shard's key columns, and returns only its problems, so the driver holds one small row per
problem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import storage
from curate.config import Pipeline, StageConfig
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir, ShardStats, StageDir, check_shard_file, shard_name
from curate.stages import STAGES
from curate.stages.spec import one_task_per_upstream_shard

SHARDS_PER_TASK = 256  # at most; fewer when a stage has few shards, so every core gets work
MAX_IN_FLIGHT = 1024  # verification tasks submitted at once
MARKER_THREADS = 16  # markers read at once by the resume size check (object stores answer in ~10 ms each)


@dataclass(frozen=True)
class Problem:
    stage: str
    shard: int
    what: str

    def line(self) -> str:
        return f"{self.stage}/{shard_name(self.shard)}: {self.what}"


def load_run_pipeline(run_uri: str) -> Pipeline:
    """The pipeline a run folder was last run with (RUN/pipeline.yaml, presets resolved, paths absolute)."""
    run = RunDir(storage.absolute(run_uri))
    if not storage.exists(run.pipeline_uri):
        raise FileNotFoundError(f"{run.uri} is not a run folder (no pipeline.yaml)")
    return parse_pipeline(storage.read_text(run.pipeline_uri), run.pipeline_uri)


def one_to_one(pipeline: Pipeline, stage: StageConfig) -> bool:
    """Whether shard i of the stage is made from shard i of its upstream alone (keys and rows equal)."""
    spec = STAGES[stage.kind]
    return pipeline.upstream(stage) is not None and (spec.plan is one_task_per_upstream_shard or spec.one_to_one)


# ---------------------------------------------------------------------------------------------------- checks


def _sorted_keys(uri: str, cache: dict[str, pa.Array | None]) -> pa.Array | None:
    """A shard's `key` column, sorted (encode reorders rows by bucket); None when it cannot be read. ``cache``
    keeps it for the other stages of a lineage that compare against the same shard."""
    if uri not in cache:
        try:
            keys = storage.read_parquet(uri, columns=["key"])["key"].combine_chunks()
            cache[uri] = keys.take(pc.array_sort_indices(keys))
        except Exception:  # no key column, or a damaged file (reported by its own check)
            cache[uri] = None
    return cache[uri]


def check_shards(
    stage_uri: str, upstream_uri: str | None, indices: list[int], keys: dict[str, pa.Array | None] | None = None
) -> dict[str, Any]:
    """Check these shards of one stage against their markers, and, given the upstream stage (one shard per
    upstream shard), their rows and keys against the upstream shard's."""
    stage = StageDir(stage_uri)
    upstream = StageDir(upstream_uri) if upstream_uri else None
    keys = {} if keys is None else keys
    problems: list[tuple[int, str]] = []
    checked = size = unchecked = 0
    for index in indices:
        try:
            stats = ShardStats.from_dict(storage.read_json(stage.marker(index)))
        except FileNotFoundError:
            problems.append((index, "no completion marker, though the stage is complete"))
            continue
        checked += 1
        size += stats.bytes
        unchecked += stats.checksum is None
        found = check_shard_file(stage.shard(index), stats)
        problems += [(index, p) for p in found]
        if upstream is None or found:
            continue
        mine, theirs = _sorted_keys(stage.shard(index), keys), _sorted_keys(upstream.shard(index), keys)
        if mine is None or theirs is None:
            continue
        if len(mine) != len(theirs):
            problems.append((index, f"{len(mine):,} rows, its upstream shard has {len(theirs):,}"))
        elif not mine.equals(theirs):
            problems.append((index, "its keys differ from its upstream shard's"))
    return {"checked": checked, "bytes": size, "unchecked": unchecked, "problems": problems}


@dataclass(frozen=True)
class Part:
    """One stage's share of a verification task: its folder, its 1:1 upstream's (keys compared), its shards."""

    stage: str
    uri: str
    upstream_uri: str | None
    indices: tuple[int, ...]


def check_lineage(parts: list[Part]) -> list[dict[str, Any]]:
    """A Ray task: the shards of stages made one from another shard by shard (upstream first in ``parts``),
    checked index by index, so an upstream shard's key column is read just after its bytes were (from the page
    cache, not the disk) and once for every stage that compares with it. One result per part."""
    wanted = [set(part.indices) for part in parts]
    results: list[dict[str, Any]] = [{"checked": 0, "bytes": 0, "unchecked": 0, "problems": []} for _ in parts]
    for index in sorted(set().union(*wanted)):
        keys: dict[str, pa.Array | None] = {}
        for part, indices, result in zip(parts, wanted, results, strict=True):
            if index in indices:
                found = check_shards(part.uri, part.upstream_uri, [index], keys)
                for name in ("checked", "bytes", "unchecked", "problems"):
                    result[name] += found[name]
    return results


@dataclass
class StageCheck:
    stage: str
    shards: int = 0
    bytes: int = 0
    unchecked: int = 0  # shards whose marker has no checksum (written before checksums existed)
    problems: list[Problem] | None = None


def _chunks(indices: list[int], per_task: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), per_task):
        yield indices[start : start + per_task]


def verify_stages(
    pipeline: Pipeline, run_uri: str, names: list[str] | None = None, log: Callable[[str], None] = print
) -> list[StageCheck]:
    """Check every finished shard of the named stages (default: all started ones) as Ray tasks (Ray must be
    initialised). Returns each stage's counts and problems."""
    import ray

    run = RunDir(storage.absolute(run_uri))
    remote = ray.remote(check_lineage).options(num_cpus=1, max_retries=3)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    checks: dict[str, StageCheck] = {}
    lineages: dict[str, list[Part]] = {}  # first stage of a lineage -> the parts, upstream first
    root_of: dict[str, str] = {}
    for stage in pipeline.stages:
        name = stage.stage_name
        folder = run.stage(name)
        if (names and name not in names) or not storage.exists(folder.record_uri):
            continue
        checks[name] = StageCheck(name, problems=[])
        done = folder.done_shards()
        planned = int(folder.read_record().get("shards", 0))
        indices = sorted(done)
        if folder.is_complete():  # every planned shard must be there
            indices = sorted(done | set(range(planned)))
        upstream = pipeline.upstream(stage)
        upstream_uri = run.stage(upstream.stage_name).uri if upstream and one_to_one(pipeline, stage) else None
        root = root_of.get(upstream.stage_name, name) if upstream_uri and upstream else name
        root_of[name] = root
        lineages.setdefault(root, []).append(Part(name, folder.uri, upstream_uri, tuple(indices)))
    jobs: list[list[Part]] = []
    for parts in lineages.values():
        indices = sorted({i for part in parts for i in part.indices})
        per_task = max(1, min(SHARDS_PER_TASK, math.ceil(len(indices) / (4 * cpus))))
        for chunk in _chunks(indices, per_task):
            low, high = chunk[0], chunk[-1]
            jobs.append([replace(p, indices=tuple(i for i in p.indices if low <= i <= high)) for p in parts])
    started = time.monotonic()
    pending: dict[Any, list[Part]] = {}
    queue = list(reversed(jobs))
    while queue or pending:
        while queue and len(pending) < MAX_IN_FLIGHT:
            job = queue.pop()
            pending[remote.remote(job)] = job
        finished, _ = ray.wait(list(pending), num_returns=1)
        for ref in finished:
            job = pending.pop(ref)
            for part, result in zip(job, ray.get(ref), strict=True):
                check = checks[part.stage]
                check.shards += result["checked"]
                check.bytes += result["bytes"]
                check.unchecked += result["unchecked"]
                check.problems += [Problem(part.stage, index, what) for index, what in result["problems"]]  # type: ignore[operator]
    seconds = time.monotonic() - started
    for check in checks.values():
        check.problems.sort(key=lambda p: p.shard)  # type: ignore[union-attr]
        note = f"; {check.unchecked:,} shards have no checksum in their marker" if check.unchecked else ""
        log(
            f"[{check.stage}] {check.shards:,} shards, {check.bytes / 1e6:,.1f} MB checked: "
            f"{len(check.problems or ()) or 'no'} problems{note}"
        )
    total = sum(c.bytes for c in checks.values())
    log(f"verify: {total / 1e9:,.2f} GB in {seconds:,.1f} s ({total / max(seconds, 1e-9) / 1e6:,.0f} MB/s)")
    return list(checks.values())


# ---------------------------------------------------------------------------------------------------- repair


def repair_plan(pipeline: Pipeline, run: RunDir, damaged: dict[str, set[int]]) -> dict[str, set[int] | None]:
    """What to redo for damaged shards (stage -> shard indices, None for the whole stage), by the rules in the
    module's docstring. Stages not started yet are left out: they have nothing to redo."""
    plan: dict[str, set[int] | None] = {name: set(shards) for name, shards in damaged.items() if shards}
    for stage in pipeline.stages:
        name = stage.stage_name
        hit = [d.stage_name for d in pipeline.dependencies(stage) if d.stage_name in plan]
        if not hit or not storage.exists(run.stage(name).record_uri):
            continue
        spec = STAGES[stage.kind]
        has_global = spec.global_step is not None and spec.global_when(stage)
        if has_global or not one_to_one(pipeline, stage) or any(plan[h] is None for h in hit):
            plan[name] = None
            continue
        own = plan.get(name, set())
        assert own is not None
        for h in hit:
            own |= plan[h] or set()
        plan[name] = own
    return plan


def describe_plan(plan: dict[str, set[int] | None]) -> str:
    parts = []
    for name, shards in plan.items():
        if shards is None:
            parts.append(f"{name} (the whole stage)")
        else:
            listed = ", ".join(str(i) for i in sorted(shards)[:10]) + (", ..." if len(shards) > 10 else "")
            parts.append(f"{name} shard{'s' if len(shards) > 1 else ''} {listed}")
    return "; ".join(parts)


def apply_plan(pipeline: Pipeline, run: RunDir, plan: dict[str, set[int] | None], log: Callable[[str], None]) -> None:
    """Remove what the plan redoes: later stages first; in each, `_SUCCESS.json`, then markers, then files."""
    order = [s.stage_name for s in pipeline.stages if s.stage_name in plan]
    for name in reversed(order):
        folder, shards = run.stage(name), plan[name]
        if shards is None:
            log(f"[{name}] repair: removing the stage, to be redone whole")
            storage.remove_tree(folder.uri)
            continue
        log(f"[{name}] repair: redoing {describe_plan({name: shards})}")
        storage.remove_file(folder.success_uri)
        for index in sorted(shards):
            storage.remove_file(folder.marker(index))
        for index in sorted(shards):
            storage.remove_file(folder.shard(index))


def _markers(folder: StageDir, indices: Iterable[int]) -> dict[int, ShardStats]:
    def read(index: int) -> tuple[int, ShardStats | None]:
        try:
            return index, ShardStats.from_dict(storage.read_json(folder.marker(index)))
        except FileNotFoundError:
            return index, None

    with ThreadPoolExecutor(MARKER_THREADS) as pool:
        return {i: s for i, s in pool.map(read, indices) if s is not None}


def size_damage(pipeline: Pipeline, run: RunDir, log: Callable[[str], None]) -> dict[str, set[int]]:
    """Shards whose file size differs from their marker's (or whose file is gone), in every started stage: what a
    resume redoes before it skips anything. One listing per stage; a complete stage whose files add up to its
    record's bytes reads no marker, others read their markers (16 at a time). Markers without a checksum (runs
    made before checksums, hand-made test stages) are not checked."""
    damaged: dict[str, set[int]] = {}
    for stage in pipeline.stages:
        name = stage.stage_name
        folder = run.stage(name)
        if not storage.exists(folder.record_uri):
            continue
        sizes = {
            int(e.relative[len("shard-") : -len(".parquet")]): e.size
            for e in storage.list_files(folder.uri, "shard-*.parquet", recursive=False)
        }
        if folder.is_complete() and sum(sizes.values()) == storage.read_json(folder.success_uri).get("bytes"):
            continue
        bad = set()
        for index, stats in _markers(folder, folder.done_shards()).items():
            if stats.checksum is not None and sizes.get(index) != stats.bytes:
                found = "missing" if index not in sizes else f"{sizes[index]:,} bytes"
                log(f"[{name}] {shard_name(index)}: {found}, its marker says {stats.bytes:,} bytes; it is redone")
                bad.add(index)
        if bad:
            damaged[name] = bad
    return damaged


__all__ = [
    "Problem",
    "apply_plan",
    "check_lineage",
    "check_shards",
    "describe_plan",
    "load_run_pipeline",
    "repair_plan",
    "size_damage",
    "verify_stages",
]
