"""Run a pipeline: for each stage, plan shards once, then process the shards not yet done on Ray.

A stage is a Ray Data pipeline over its pending shard tasks: `from_items(tasks).map_batches(...)`,
with plain tasks for CPU stages and an actor pool (model loaded once per actor) for model stages.
Each worker writes its output shard atomically and then its completion marker, so the driver only
sees small result rows and a killed run resumes at the first shard without a marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate import __version__, attempts, fit, guard, interrupt, lease, steps, storage
from curate.checksums import Digest
from curate.cluster import ray_session, resolve_address
from curate.config import Pipeline, StageConfig
from curate.progress import Progress
from curate.report import RunReport
from curate.runfolder import RunDir, ShardStats, ShardTask, StageDir, summarize
from curate.schema import SCHEMA_VERSION, parquet_options
from curate.stages import STAGES, StageSpec, WorkContext
from curate.steps import GlobalPhase, GlobalTask, PhaseResults
from curate.verify import apply_plan, repair_plan, size_damage


class RunError(Exception):
    """The run cannot go on (before work: a bad selection or a changed stage; after: failed shards)."""


@dataclass(frozen=True)
class StageJob:
    """What a worker is handed: the stage kind, its config and context (all picklable)."""

    kind: str
    config: StageConfig
    context: WorkContext
    ledger: attempts.Ledger | None = None  # the record of shard starts; None: starts are not counted
    retries: int = 0  # starts of a shard whose worker died, after the first, before it is reported failed


def execute_shard(job: StageJob, task: ShardTask, state: Any) -> dict[str, Any]:
    """Process one shard, write it, then its marker. Errors are returned, never raised."""
    spec = STAGES[job.kind]
    stage_dir = StageDir(storage.join(job.context.run_uri, job.context.stage_name))
    started = time.perf_counter()
    try:
        output = spec.process(job.config, task, job.context, state)
        table = output.table.replace_schema_metadata(
            {
                **(output.table.schema.metadata or {}),
                b"curate.stage": job.context.stage_name.encode(),
                b"curate.kind": job.kind.encode(),
                b"curate.version": __version__.encode(),
                b"curate.schema_version": SCHEMA_VERSION.encode(),
            }
        )
        options = dict(output.options) if output.options is not None else parquet_options(table)
        if output.row_groups is not None:
            options.pop("row_group_size", None)
            options["row_group_sizes"] = output.row_groups
        digest = Digest()
        size = storage.write_parquet_atomic(stage_dir.shard(task.index), table, digest=digest, **options)
        status = Counter(table["status"].to_pylist()) if "status" in table.column_names else {"ok": table.num_rows}
        seconds = round(time.perf_counter() - started, 4)
        stats = ShardStats(task.index, table.num_rows, dict(status), seconds, size, output.extra, digest.tagged())
        stage_dir.write_marker(stats)
        return {"shard": task.index, "ok": True, "rows": table.num_rows, "error": ""}
    except Exception:
        return {"shard": task.index, "ok": False, "rows": 0, "error": traceback.format_exc(limit=8)}


def _tasks_from_batch(batch: dict[str, np.ndarray]) -> list[ShardTask]:
    return [ShardTask(int(i), tuple(json.loads(s))) for i, s in zip(batch["index"], batch["inputs"], strict=True)]


def run_shard(job: StageJob, task: ShardTask, state: Any) -> dict[str, Any]:
    """`execute_shard`, counted: a shard whose worker died in each of its allowed starts is reported, not started
    again (curate.attempts); a shard done after such deaths says so in `note`."""
    attempt = attempts.begin(job.ledger, task.index, job.retries) if job.ledger is not None else None
    if attempt is not None and attempt.exhausted:
        with contextlib.suppress(Exception):
            job.ledger.refuse(task.index)  # type: ignore[union-attr]
        return {"shard": task.index, "ok": False, "rows": 0, "error": attempt.failure(job.context.stage_name)}
    attempts.set_title(job.context.stage_name, task.index, attempt)
    result = execute_shard(job, task, state)
    if job.ledger is not None:
        with contextlib.suppress(Exception):  # a lost record only loses the bound
            job.ledger.end(task.index)
    return {**result, "note": attempt.deaths() if attempt is not None and attempt.earlier else ""}


def _columns(results: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r.get(name, "") for r in results] for name in ("shard", "ok", "rows", "error", "note")}


def run_shard_batch(batch: dict[str, np.ndarray], job: StageJob) -> dict[str, list[Any]]:
    """Task-pool entry point for stages without per-worker state."""
    return _columns([run_shard(job, task, None) for task in _tasks_from_batch(batch)])


class ShardActor:
    """Actor-pool entry point: the stage's `setup` (a model load) runs once per actor."""

    def __init__(self, job: StageJob):
        self.job = job
        setup = STAGES[job.kind].setup
        assert setup is not None
        self.state = setup(job.config, job.context)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        return _columns([run_shard(self.job, task, self.state) for task in _tasks_from_batch(batch)])


def _map_shards(spec: StageSpec, job: StageJob, tasks: list[ShardTask]):
    import ray.data

    resources = job.config.resources
    items = [{"index": t.index, "inputs": json.dumps(list(t.inputs))} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 10_000))
    # a block whose task Ray gave up on costs its shards only (reported from the record of starts), not the stage
    ds.context.max_errored_blocks = -1
    remote = {**fit.ray_options(resources), "num_gpus": resources.num_gpus or None}
    if spec.setup is None:
        return ds.map_batches(
            run_shard_batch,
            fn_kwargs={"job": job},
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=resources.concurrency),
            **remote,
        )
    return ds.map_batches(
        ShardActor,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=resources.concurrency or None, max_tasks_in_flight_per_actor=2
        ),
        **remote,
    )


def _closing_step(job: StageJob, upstream: StageDir | None, stage_dir: StageDir) -> dict[str, Any]:
    finish = STAGES[job.kind].finish
    assert finish is not None
    return finish(job.config, upstream, stage_dir, job.context)


def _task_options(job: StageJob) -> dict[str, Any]:
    return fit.ray_options(job.config.resources)


def run_closing_step(job: StageJob, upstream: StageDir | None, stage_dir: StageDir) -> dict[str, Any]:
    """A stage's closing step (`finish`, after the shards) as one Ray task with the stage's resources."""
    import ray

    remote = ray.remote(_closing_step).options(**_task_options(job), max_retries=0)
    return ray.get(remote.remote(job, upstream, stage_dir))


TASK_RETRIES = 3  # a task whose worker or node died is run again (Ray's system-failure retries)
MAX_IN_FLIGHT = 4096  # tasks submitted at once when the stage sets no concurrency (Ray queues them by resources)


def run_phase(job: StageJob, stage_dir: StageDir, phase: GlobalPhase, log=print) -> PhaseResults:
    """One phase of a global step: its tasks without a marker as Ray tasks (at most `resources.concurrency` at
    once), the others' results read back from their markers. A task that raises fails the phase after the
    others have finished; its marker is missing, so a re-run runs only it (and the phases after)."""
    import ray

    name = job.context.stage_name
    done = steps.done_tasks(stage_dir.global_uri, phase.name)
    results: PhaseResults = {t.name: steps.read_result(stage_dir.global_uri, phase.name, t.name) for t in phase.tasks
                             if t.name in done}  # fmt: skip
    queue = [t for t in phase.tasks if t.name not in done]
    if not queue:
        return results
    log(f"[{name}] global step, {phase.name}: {len(queue)} of {len(phase.tasks)} tasks to run")
    remote = ray.remote(steps.run_task)
    options = {**_task_options(job), "max_retries": TASK_RETRIES}
    limit = job.config.resources.concurrency or MAX_IN_FLIGHT
    in_flight: dict[Any, GlobalTask] = {}
    failures: dict[str, str] = {}
    queue.reverse()
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            task = queue.pop()
            own = {"num_cpus": task.num_cpus} if task.num_cpus is not None else {}
            named = remote.options(**{**options, **own}, name=f"{name}:{phase.name}:{task.name}")
            ref = named.remote(stage_dir.global_uri, phase.name, task)
            in_flight[ref] = task
        refs = list(in_flight)
        finished, rest = ray.wait(refs, num_returns=1)
        if rest:  # and every other one finished by now (one wait per finished task would be quadratic)
            finished += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in finished:
            task = in_flight.pop(ref)
            try:
                results[task.name] = ray.get(ref)["result"]
            except Exception as e:  # the task raised (Ray retried it if its worker died)
                failures[task.name] = str(e)
    if failures:
        first = sorted(failures)[0]
        raise RunError(
            f"{len(failures)} of {len(phase.tasks)} tasks of phase {phase.name!r} failed; finished tasks keep "
            f"their markers and a re-run runs only the others. First failure, {first}:\n{failures[first]}"
        )
    return {t.name: results[t.name] for t in phase.tasks}


def run_global_step(job: StageJob, upstream: StageDir | None, stage_dir: StageDir, log=print) -> dict[str, Any]:
    """Drive a stage's global step (curate.steps): phases of Ray tasks, each phase's results sent back into the
    stage's generator, until it returns its summary. Runs on the driver, which only holds the small results."""
    spec = STAGES[job.kind]
    assert spec.global_step is not None
    plan = spec.global_step(job.config, upstream, stage_dir, job.context)
    results: PhaseResults | None = None
    started = time.perf_counter()
    phases: list[str] = []
    while True:
        try:
            phase = plan.send(results)  # type: ignore[arg-type]
        except StopIteration as stop:
            summary = dict(stop.value or {})
            summary.setdefault("seconds", round(time.perf_counter() - started, 3))
            summary["phases"] = phases
            summary["driver_peak_rss_bytes"] = steps.peak_rss()  # this process, for the whole run so far
            return summary
        phases.append(phase.name)
        results = run_phase(job, stage_dir, phase, log)


@contextlib.contextmanager
def stage_services(spec: StageSpec, job: StageJob, log=print) -> Iterator[StageJob]:
    """The job, with what the stage's `services` yields (caption's inference servers) in its context, for as long
    as the shards run; the services stop however the block ends (Ctrl-C included)."""
    if spec.services is None:
        yield job
        return
    name = job.context.stage_name
    with contextlib.ExitStack() as stack:
        try:
            value = stack.enter_context(spec.services(job.config, job.context, lambda line: log(f"[{name}] {line}")))
        except Exception as e:
            raise RunError(f"stage {name!r}: {e}") from e
        yield dataclasses.replace(job, context=dataclasses.replace(job.context, services=value))


def expected_rows(stage: StageConfig, tasks: list[ShardTask], upstream: StageDir | None) -> dict[int, int]:
    """Rows each shard should have (for progress): the stage's own count when it has one, else one per input
    for sources and the upstream shard's rows for transforms."""
    count = STAGES[stage.kind].task_rows
    if count is not None:
        return {t.index: count(stage, t) for t in tasks}
    if upstream is None:
        return {t.index: len(t.inputs) for t in tasks}
    rows = {s.shard: s.rows for s in upstream.shard_stats()}
    return {t.index: rows.get(t.index, 0) for t in tasks}


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_recorded_settings(run: RunDir, stage: StageConfig) -> None:
    """A stage already started in this run folder must be resumed with the settings it was started with."""
    stage_dir = run.stage(stage.stage_name)
    if not storage.exists(stage_dir.record_uri):
        return
    record = stage_dir.read_record()
    if record.get("kind") != stage.kind or record.get("fingerprint") != stage.fingerprint():
        raise RunError(
            f"stage {stage.stage_name!r} in {run.uri} was made with different settings "
            f"(recorded {record.get('kind')}/{record.get('fingerprint')}, now {stage.kind}/{stage.fingerprint()}). "
            f"Use another --output, or `curate run ... --redo {stage.stage_name}` to redo it (and the stages "
            f"reading it) with the new settings."
        )


def prepare_stage(pipeline: Pipeline, run: RunDir, stage: StageConfig) -> tuple[StageDir, list[ShardTask]]:
    """The stage's plan: read back when it exists (after checking the settings match), else made now."""
    spec = STAGES[stage.kind]
    stage_dir = run.stage(stage.stage_name)
    upstream_cfg = pipeline.upstream(stage)
    upstream = run.stage(upstream_cfg.stage_name) if upstream_cfg else None
    check_recorded_settings(run, stage)
    tasks = stage_dir.read_plan()
    if tasks is not None:
        return stage_dir, tasks
    tasks = spec.plan(stage, upstream)
    stage_dir.write_plan(
        tasks,
        {
            "kind": stage.kind,
            "fingerprint": stage.fingerprint(),
            "config": stage.model_dump(mode="json"),
            "upstream": upstream_cfg.stage_name if upstream_cfg else None,
            "planned_at": _utcnow(),
        },
    )
    return stage_dir, tasks


def run_stage(pipeline: Pipeline, run: RunDir, stage: StageConfig, log=print) -> dict[str, Any]:
    spec = STAGES[stage.kind]
    name = stage.stage_name
    stage_dir = run.stage(name)
    if stage_dir.is_complete():
        log(f"[{name}] complete already; skipped")
        return storage.read_json(stage_dir.success_uri)
    stage_dir, tasks = prepare_stage(pipeline, run, stage)
    upstream_cfg = pipeline.upstream(stage)
    upstream = run.stage(upstream_cfg.stage_name) if upstream_cfg else None
    expected = expected_rows(stage, tasks, upstream)
    guard.remove_all_temporaries(stage_dir.uri)

    done = stage_dir.done_shards()
    pending = [t for t in tasks if t.index not in done]
    progress = Progress(name, len(tasks), sum(expected.values()), write=log)
    progress.shards_done = len(tasks) - len(pending)
    progress.rows_done = sum(expected[i] for i in done if i in expected)
    if done:
        log(f"[{name}] resuming: {len(done)} of {len(tasks)} shards already done")
    progress.start()

    failures: dict[int, str] = {}
    started = time.monotonic()
    joined = {j: run.stage(j).uri for j in stage.join}
    context = WorkContext(run.uri, name, upstream.uri if upstream else None, dict(pipeline.models), joined)
    job = StageJob(stage.kind, stage, context)
    if pending:
        ensure_fits(pipeline, [stage])  # the cluster as it is now: it may have shrunk since the run began
        with guard.guarded(pipeline, stage, stage_dir, len(tasks), spec.setup is not None, log) as guarded:
            job = StageJob(stage.kind, stage, context, guarded.ledger, guarded.retries)
            needs_global = spec.global_step is not None and spec.global_when(stage)
            if needs_global and not storage.exists(stage_dir.global_marker_uri):
                log(f"[{name}] global step")
                try:
                    summary = run_global_step(job, upstream, stage_dir, log)
                except Exception as e:
                    raise RunError(f"stage {name!r}: the global step failed; a re-run resumes it.\n{e}") from e
                storage.write_json(stage_dir.global_marker_uri, {"completed_at": _utcnow(), **summary})
            reported: set[int] = set()
            try:
                # closed on the way out, so an interruption stops Ray Data's executor (and its actors) at once
                with (
                    stage_services(spec, job, log) as job,
                    contextlib.closing(iter(_map_shards(spec, job, pending).iter_rows())) as rows,
                ):
                    for result in rows:
                        guarded.tick()
                        reported.add(int(result["shard"]))
                        if result["ok"]:
                            progress.update(int(result["rows"]))
                            if result["note"]:
                                log(f"[{name}] shard {result['shard']} done after its worker died:\n{result['note']}")
                        else:
                            failures[int(result["shard"])] = str(result["error"])
                            progress.update(0, ok=False)
            except RunError:
                raise
            except Exception as e:  # Ray Data stopped the stage (for example actors that die while starting)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RunError(
                    f"stage {name!r}: Ray stopped the stage ({type(e).__name__}: {first}); finished shards are kept "
                    f"and a re-run resumes"
                ) from e
            for shard in sorted({t.index for t in pending} - reported):  # Ray gave up on their tasks
                failures[shard] = guarded.missing(shard, name)
    if failures:
        first = next(iter(sorted(failures)))
        raise RunError(
            f"stage {name!r}: {len(failures)} of {len(tasks)} shards failed; the others are saved and a re-run "
            f"redoes only the failed ones. First failure, shard {first}:\n{failures[first]}"
        )
    missing = [t.index for t in tasks if t.index not in stage_dir.done_shards()]
    if missing:
        raise RunError(f"stage {name!r}: shards {missing[:10]} have no completion marker after the run")
    finish: dict[str, Any] = {}
    if spec.finish is not None:
        log(f"[{name}] closing step")
        try:
            finish = {"finish": run_closing_step(job, upstream, stage_dir)}
        except Exception as e:
            raise RunError(f"stage {name!r}: the closing step failed; a re-run retries it.\n{e}") from e
    record = {
        "stage": name,
        "kind": stage.kind,
        "completed_at": _utcnow(),
        "wall_seconds_last_run": round(time.monotonic() - started, 3),
        **summarize(stage_dir.shard_stats()),
        **finish,
    }
    storage.write_json(stage_dir.success_uri, record)
    log(f"[{name}] complete: {record['rows']:,} rows in {record['shards']} shards, status {record['status']}")
    return record


def ensure_fits(pipeline: Pipeline, stages: list[StageConfig]) -> None:
    """Stop before any work of `stages` when a worker of one of them fits no node of the cluster (curate.fit)."""
    if not stages:
        return
    cluster = fit.read_cluster()
    problems = fit.check_stages(pipeline, stages, cluster)
    if problems:
        names = [repr(s.stage_name) for s in stages if fit.stage_problems(pipeline, s, cluster)]
        which = f"stage {names[0]}" if len(names) == 1 else f"stages {', '.join(names)}"
        raise RunError(
            f"{which} cannot run on this Ray cluster ({cluster.describe()}): no node can hold one of "
            f"{'its' if len(names) == 1 else 'their'} workers; stopped before {'its' if len(names) == 1 else 'their'} "
            f"work:\n" + "\n".join(f"  {p}" for p in problems)
        )


def _check_names(pipeline: Pipeline, names: list[str] | None, flag: str) -> None:
    known = [s.stage_name for s in pipeline.stages]
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise RunError(f"{flag}: no stage named {', '.join(map(repr, unknown))} (stages: {', '.join(known)})")


def redo_stages(pipeline: Pipeline, names: list[str] | None) -> list[StageConfig]:
    """The named stages and every later stage that reads one of them (as input or join, directly or through
    other stages), in pipeline order: what `--redo` removes and runs again. Stages they read are untouched."""
    _check_names(pipeline, names, "--redo")
    hit = set(names or ())
    out = []
    for stage in pipeline.stages:
        if stage.stage_name in hit or any(d.stage_name in hit for d in pipeline.dependencies(stage)):
            hit.add(stage.stage_name)
            out.append(stage)
    return out


def select_stages(
    pipeline: Pipeline, only: list[str] | None, run: RunDir, redo: list[str] | None = None
) -> list[StageConfig]:
    """The stages to run, checked before any work: names exist and every upstream is run or complete.
    Stages being redone (`redo_stages`) are always run and never count as complete."""
    _check_names(pipeline, only, "--stages")
    redone = {s.stage_name for s in redo_stages(pipeline, redo)}
    selected = [s for s in pipeline.stages if not only or s.stage_name in only or s.stage_name in redone]
    chosen = {s.stage_name for s in selected}
    for stage in selected:
        for needed in pipeline.dependencies(stage):
            if needed.stage_name not in chosen and not run.stage(needed.stage_name).is_complete():
                raise RunError(
                    f"stage {stage.stage_name!r} reads stage {needed.stage_name!r}, which is neither complete in "
                    f"{run.uri} nor selected; add it to --stages"
                )
    return selected


def run_pipeline(
    pipeline: Pipeline,
    output: str | None = None,
    only: list[str] | None = None,
    address: str | None = None,
    log=print,
    redo: list[str] | None = None,
    take_over: bool = False,
    repair: dict[str, set[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or resume) the selected stages in order; returns each stage's completion record.

    ``redo`` names stages to do again from scratch (new thresholds of a filter, say): their folders and
    those of every stage reading them are removed, after every check has passed, and they run again;
    the stages they read (a score stage's model work) are kept as they are. ``repair`` names damaged shards
    (`curate verify --repair`): they and what was made from them are redone (curate.verify.repair_plan), as are
    shards whose size no longer matches their marker. The run holds the folder's lease throughout
    (curate.lease); ``take_over`` takes it from a holder that has not expired."""
    run = RunDir(storage.absolute(output or pipeline.output))
    env = pipeline.storage.environment()
    storage.use_environment(env)
    try:
        settings = pipeline.lease
        with lease.holding(run.uri, settings.ttl_seconds, settings.renew_seconds, take_over, log):
            return _run_holding_lease(pipeline, run, only, address, log, redo, repair or {}, env)
    except (lease.LeaseHeld, lease.LeaseLost) as e:
        raise RunError(str(e)) from e


def _run_holding_lease(
    pipeline: Pipeline,
    run: RunDir,
    only: list[str] | None,
    address: str | None,
    log,
    redo: list[str] | None,
    repair: dict[str, set[int]],
    env: dict[str, str],
) -> dict[str, dict[str, Any]]:
    damaged = size_damage(pipeline, run, log)
    for name, shards in repair.items():
        damaged.setdefault(name, set()).update(shards)
    fixing = repair_plan(pipeline, run, damaged)
    if only is not None and fixing:
        only = [*only, *(name for name in fixing if name not in only)]
    selected = select_stages(pipeline, only, run, redo)
    redone = redo_stages(pipeline, redo)
    redone_names = {s.stage_name for s in redone}
    for stage in selected:  # fail on changed settings before starting Ray or doing any work
        if stage.stage_name not in redone_names:
            check_recorded_settings(run, stage)
    apply_plan(pipeline, run, fixing, log)
    for stage in redone:
        folder = run.stage(stage.stage_name).uri
        if storage.exists(folder):
            log(f"[{stage.stage_name}] --redo: removing {folder}")
            storage.remove_tree(folder)
    storage.makedirs(run.uri)
    storage.write_atomic(run.pipeline_uri, pipeline.to_yaml().encode())
    entry = {"started_at": _utcnow(), "stages": [s.stage_name for s in selected], "version": __version__}
    if redone:
        entry["redo"] = [s.stage_name for s in redone]
    if fixing:
        entry["repair"] = {name: sorted(shards) if shards is not None else "all" for name, shards in fixing.items()}
    records: dict[str, dict[str, Any]] = {}
    with interrupt.interruptible(), ray_session(resolve_address(address, pipeline.ray), pipeline.ray, env) as where:
        interrupt.reinstall()  # ray.init replaced the SIGTERM handler
        log(f"run folder {run.uri} on {where}")
        report = RunReport(run.uri, log)  # RUN/_report/index.html after each stage and at the end
        try:
            ensure_fits(pipeline, [s for s in selected if not run.stage(s.stage_name).is_complete()])
            for stage in selected:
                records[stage.stage_name] = run_stage(pipeline, run, stage, log=log)
                report.stage_done()
        finally:
            run.append_log({**entry, "finished_at": _utcnow(), "completed": list(records), "cluster": where})
            report.close()
    return records


__all__ = ["RunError", "redo_stages", "run_pipeline", "run_stage", "select_stages"]
