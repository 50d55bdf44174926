"""`curate check`: the plan of a pipeline, in words, without doing any work."""

from __future__ import annotations

from curate import fit, storage
from curate.cluster import resolve_address
from curate.config import Pipeline
from curate.runfolder import RunDir
from curate.stages import STAGES


def _resources(stage) -> str:
    r = stage.resources
    spec = STAGES[stage.kind]
    worker = "actor pool (model loaded once per actor)" if spec.setup is not None else "tasks"
    if spec.global_step is not None and spec.global_when(stage):
        worker = f"a global step of Ray tasks first, then {worker}"
    bits = [f"{r.num_cpus:g} CPU", f"{r.num_gpus:g} GPU per worker", f"concurrency {r.concurrency or 'auto'}"]
    if r.batch_size:
        bits.append(f"batch {r.batch_size}")
    if r.memory:
        bits.append(f"memory {r.memory / 2**30:.1f} GiB")
    return ", ".join(bits) + f"; {worker}"


def _roles(stage, pipeline: Pipeline) -> tuple[str, ...]:
    """The roles the stage loads: its required ones and the optional ones the pipeline defines."""
    return stage.model_roles + tuple(r for r in stage.optional_model_roles if r in pipeline.models)


def _state(run: RunDir, name: str) -> str:
    if storage.has_scheme(run.uri) and not run.uri.lower().startswith("file://"):
        return "not checked (remote run folder; `curate run` reads its state, `curate inspect` shows it)"
    stage = run.stage(name)
    if stage.is_complete():
        return "complete (will be skipped)"
    if storage.exists(stage.record_uri):
        planned = stage.read_record().get("shards", 0)
        return f"{len(stage.done_shards())}/{planned} shards done (will resume)"
    return "not started"


def _fits(stage, cluster: fit.Cluster) -> str:
    request = fit.request_of(stage.resources)
    nodes = sum(fit.holds(n.resources, request) for n in cluster.nodes)
    types = [t.name for t in cluster.node_types if fit.holds(t.resources, request)]
    text = f"{nodes} of {len(cluster.nodes)} live nodes" + (f"; can be added: {', '.join(types)}" if types else "")
    if not nodes and not types:
        text += " (see below)" if fit.misfits(request, cluster) else " (an autoscaler may add one)"
    return text


def describe(
    pipeline: Pipeline, output: str | None = None, address: str | None = None, cluster: fit.Cluster | None = None
) -> str:
    """The plan in words; with `cluster` (read from the cluster at `address`), where each stage's workers fit."""
    run = RunDir(storage.absolute(output or pipeline.output))
    where = resolve_address(address, pipeline.ray)
    lines = [
        f"pipeline {pipeline.name} ({pipeline.source}): valid",
        f"run folder: {run.uri}",
        f"ray: {'cluster at ' + where if where else 'embedded local Ray, started and stopped by the command'}"
        + (f" ({cluster.describe()})" if cluster is not None else ""),
        f"lease: expires {pipeline.lease.ttl_seconds:g} s after its last renewal, renewed every "
        f"{pipeline.lease.renew_seconds:g} s",
    ]
    if handed := pipeline.storage.environment():
        lines.append(f"storage: {', '.join(sorted(handed))} set on the driver and every worker")
    if pipeline.models:
        preset = f" (preset {pipeline.model_preset})" if pipeline.model_preset else ""
        lines.append(f"models{preset}:")
        lines += [f"  {role:<10} {spec.describe()}" for role, spec in pipeline.models.items()]
    lines.append("stages:")
    for number, stage in enumerate(pipeline.stages, 1):
        spec = STAGES[stage.kind]
        upstream = pipeline.upstream(stage)
        source = (
            spec.describe_inputs(stage)
            if upstream is None
            else f"stage {upstream.stage_name} ({run.stage(upstream.stage_name).uri})"
        )
        lines += [
            f"  {number}. {stage.stage_name} [{stage.kind}]: {spec.summary}",
            f"     input:     {source}",
            f"     output:    {run.stage(stage.stage_name).uri}/shard-*.parquet",
            f"     models:    {', '.join(_roles(stage, pipeline)) or '-'}",
            f"     resources: {_resources(stage)}",
            *([f"     fits:      {_fits(stage, cluster)}"] if cluster is not None else []),
            f"     state:     {_state(run, stage.stage_name)}",
        ]
    return "\n".join(lines)


def read_cluster(
    pipeline: Pipeline, stages: list, run: RunDir, address: str | None
) -> tuple[fit.Cluster | None, list[str]]:
    """With `--address`: the cluster's nodes, and the `file:line: field: problem` of every stage to run whose
    workers fit none of them (curate.fit). Without it: nothing, and no Ray is started or joined."""
    from curate.cluster import ray_session

    if not address:
        return None, []
    local = not storage.has_scheme(run.uri) or run.uri.lower().startswith("file://")
    pending = [s for s in stages if not (local and run.stage(s.stage_name).is_complete())]
    try:
        with ray_session(address, pipeline.ray):
            cluster = fit.read_cluster()
    except (ConnectionError, RuntimeError, ValueError) as e:  # what ray.init raises for an address it cannot use
        return None, [f"cannot read the Ray cluster at {address}: {e}"]
    return cluster, fit.check_stages(pipeline, pending, cluster)
