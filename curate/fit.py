"""Do a stage's workers fit the cluster? A stage's per-worker request (what Ray reserves for one of its tasks or
actors: CPUs, GPUs, memory, accelerator type, custom resources) against the cluster's live nodes and the node types
its autoscaler can add, before any work of the stage.

Ray itself waits for ever on a request that no node can meet: its autoscaler logs "No available node types can
fulfill resource request" every half minute and the run hangs. The request is computed by Ray's own
`resources_from_ray_options` from the options the runner passes to Ray, so what is checked is what Ray will ask.

What Ray 2.60 lets a driver read (checked on these machines, with only `ray[data]`, no dashboard):
- the live nodes and their total resources: `ray.nodes()`;
- the node types an autoscaler can add: the GCS's cluster config (`ray._private.state.state.get_cluster_config()`,
  node groups with their resources and min/max counts; Ray Data and Ray Train read it to size themselves). It is
  written through the GCS's `ReportClusterConfig` call by the platform that runs the autoscaler. Ray 2.60's own
  autoscalers do not write it: the v1 monitor (`ray up`, `ray start --autoscaling-config`) publishes only a JSON
  status (`__autoscaling_status`, no node shapes) and the v2 autoscaler (KubeRay) its autoscaling state;
- that an autoscaler runs at all: the v2 flag, or a v1 status whose node types are not just the live nodes (every
  `ray start --head` runs the v1 monitor, with a read-only provider that adds nothing unless given a config).
Where an autoscaler runs but publishes no node types, a request that no live node meets is not refused before
work (a node that fits may be added); the stall watchdog (curate.watchdog) decides later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.config import Pipeline, Resources, StageConfig, format_path, load_yaml

ACCELERATOR = "accelerator_type:"
FIELDS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}
UNITS = {"CPU": ("CPU", "CPUs"), "GPU": ("GPU", "GPUs")}


def ray_options(resources: Resources) -> dict[str, Any]:
    """The Ray options of one worker of a stage (task or actor): the runner passes exactly these to Ray."""
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory:
        options["memory"] = resources.memory
    if resources.accelerator_type:
        options["accelerator_type"] = resources.accelerator_type
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return options


def request_of(resources: Resources) -> dict[str, float]:
    """What Ray reserves for one worker, in Ray's resource names (zero amounts dropped, as Ray drops them)."""
    from ray._common.utils import resources_from_ray_options

    return {k: float(v) for k, v in resources_from_ray_options(ray_options(resources)).items() if v}


@dataclass(frozen=True)
class Capacity:
    """What one live node, or one node type an autoscaler can add, offers."""

    name: str  # "node 10.0.0.2" or "node type gpu-a100 (autoscaler: up to 8)"
    resources: dict[str, float]


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Capacity, ...]
    node_types: tuple[Capacity, ...] = ()  # what an autoscaler can add, where it publishes them
    autoscaler: bool = False  # an autoscaler runs (whether or not it publishes its node types)

    @property
    def shapes(self) -> tuple[Capacity, ...]:
        return self.nodes + self.node_types

    def describe(self) -> str:
        nodes = f"{len(self.nodes)} live node{'s' * (len(self.nodes) != 1)}"
        if self.node_types:
            return f"{nodes} and {len(self.node_types)} node type(s) its autoscaler can add"
        if self.autoscaler:
            return f"{nodes}; an autoscaler runs but publishes no node types"
        return f"{nodes}, no autoscaler"


def read_cluster() -> Cluster:
    """The connected cluster's live nodes, and what its autoscaler says it can add."""
    import ray

    nodes = tuple(
        Capacity(f"node {n['NodeManagerAddress']}", {k: float(v) for k, v in n["Resources"].items()})
        for n in ray.nodes()
        if n["Alive"]
    )
    node_types: list[Capacity] = []
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the record: no node types known
        config = None
    for group in config.node_group_configs if config is not None else ():
        if group.max_count != 0 and group.resources:
            most = "no limit" if group.max_count < 0 else f"up to {group.max_count}"
            node_types.append(Capacity(f"node type {group.name} (autoscaler: {most})", dict(group.resources)))
    return Cluster(nodes, tuple(node_types), bool(node_types) or _autoscaler_runs())


def _autoscaler_runs() -> bool:
    """Whether an autoscaler that can add nodes runs. Every `ray start --head` runs Ray's v1 monitor, with a
    read-only node provider unless given an autoscaling config: its status names each node's type after the node
    itself (`format_readonly_node_type`), and it adds nothing. A v2 autoscaler sets the v2 flag."""
    import ray._raylet
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        v2 = _internal_kv_get(
            ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY, namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
        )
        status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or b"{}")
    except Exception:  # the records cannot be read: assume none, as for a plain `ray start` cluster
        return False
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return v2 == b"1" or any(kind != format_readonly_node_type(node) for node, kind in types.items())


def holds(offer: dict[str, float], request: dict[str, float]) -> bool:
    return all(offer.get(key, 0.0) + 1e-9 >= amount for key, amount in request.items())


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**30:.1f} GiB of memory"
    if key in UNITS:
        one, many = UNITS[key]
        return f"{value:g} {one if value <= 1 else many}"
    return f"{value:g} of resource {key!r}"


def field_of(key: str) -> str:
    """The `resources` field of a stage config that asks for a Ray resource."""
    if key.startswith(ACCELERATOR):
        return "accelerator_type"
    return FIELDS.get(key, f"custom.{key}")


def _why(key: str, amount: float, shapes: tuple[Capacity, ...]) -> str:
    if key.startswith(ACCELERATOR):
        kinds = sorted({k[len(ACCELERATOR) :] for s in shapes for k in s.resources if k.startswith(ACCELERATOR)})
        have = (
            f"the nodes' accelerator types are {', '.join(kinds)}" if kinds else "no node declares an accelerator type"
        )
        return f"asks for accelerator type {key[len(ACCELERATOR) :]!r}, but {have}"
    largest = max(shapes, key=lambda s: s.resources.get(key, 0.0))
    most = largest.resources.get(key, 0.0)
    if most == 0:
        what = {"GPU": "a GPU", "CPU": "a CPU", "memory": "memory for tasks"}.get(key, f"resource {key!r}")
        return f"asks {_amount(key, amount)} per worker, but no node has {what}"
    return (
        f"asks {_amount(key, amount)} per worker, but the largest {largest.name.split(' (')[0]} has "
        f"{_amount(key, most)}"
    )


def _fits_some(key: str, amount: float, shapes: tuple[Capacity, ...]) -> bool:
    return any(s.resources.get(key, 0.0) + 1e-9 >= amount for s in shapes)


def _not_together(request: dict[str, float], shapes: tuple[Capacity, ...]) -> str:
    """Each part of the request fits some node, but no node holds all of it: say what the nodes that hold its
    rarest part (a GPU, a custom resource, ... before memory and CPUs) lack."""
    asks = " and ".join(_amount(k, v) for k, v in request.items() if not k.startswith(ACCELERATOR))
    anchor = min(request, key=lambda k: (k == "CPU", k == "memory"))
    holders = [s for s in shapes if holds(s.resources, {anchor: request[anchor]})]
    lacking = []
    for key, amount in request.items():
        most = max(s.resources.get(key, 0.0) for s in holders)
        if key != anchor and most + 1e-9 < amount:
            lacking.append(_amount(key, most))
    rare = f"accelerator type {anchor[len(ACCELERATOR) :]}" if anchor.startswith(ACCELERATOR) else None
    with_it = rare or _amount(anchor, request[anchor])
    return (
        f"asks {asks} per worker together, but no node has all of it: the nodes with {with_it} have at most "
        f"{', '.join(lacking)}"
    )


def misfits(request: dict[str, float], cluster: Cluster) -> list[tuple[str, str]]:
    """(field, problem) for a request that no node, nor node type an autoscaler can add, can hold; empty when
    one can (or when an autoscaler runs that publishes no node types: it may add one that fits)."""
    shapes = cluster.shapes
    if any(holds(s.resources, request) for s in shapes) or (cluster.autoscaler and not cluster.node_types):
        return []
    if not shapes:
        return [("", "the cluster has no live node")]
    problems = [(field_of(k), _why(k, v, shapes)) for k, v in request.items() if not _fits_some(k, v, shapes)]
    return problems or [("", _not_together(request, shapes))]


def describe_offer(offer: dict[str, float], request: Iterable[str]) -> str:
    return ", ".join(f"{k} {offer.get(k, 0):g}" if k != "memory" else f"memory {offer.get(k, 0) / 2**30:.1f} GiB"
                     for k in request)  # fmt: skip


@dataclass
class Placement:
    """Where a pipeline's stages are in its file, for `file:line: field` messages."""

    pipeline: Pipeline
    _source: Any = field(default=None, init=False)

    def where(self, index: int, resource_field: str) -> str:
        path = ("stages", index, "resources", *resource_field.split(".")) if resource_field else (
            "stages", index, "resources")  # fmt: skip
        if self._source is None:
            try:
                self._source = load_yaml(Path(self.pipeline.source).read_text(), self.pipeline.source)[1]
            except OSError:
                self._source = False
        where = self._source.where(path) if self._source else self.pipeline.source
        return f"{where}: {format_path(path)}"


def stage_problems(pipeline: Pipeline, stage: StageConfig, cluster: Cluster) -> list[str]:
    """`file:line: stages[i].resources.field: problem` for each part of the stage's request no node can hold."""
    index = pipeline.stages.index(stage)
    place = Placement(pipeline)
    return [
        f"{place.where(index, name)}: stage {stage.stage_name!r} {problem}"
        for name, problem in misfits(request_of(stage.resources), cluster)
    ]


def check_stages(pipeline: Pipeline, stages: Iterable[StageConfig], cluster: Cluster) -> list[str]:
    return [problem for stage in stages for problem in stage_problems(pipeline, stage, cluster)]
