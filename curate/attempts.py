"""How many times each shard was started in this run, so that a shard whose worker keeps dying (killed for
memory by the kernel or Ray, a crash in native code, a lost node) becomes that shard's failure after
`ray.shard_retries` retries, naming the workers that died and why, instead of being retried for ever.

Ray Data cannot bound this per shard: its actor pool restarts a dead actor and retries its tasks without limit
(`max_restarts=-1`, `max_task_retries=-1` in 2.60), and a bounded `max_restarts` leaves a dead actor in the pool that
is never replaced, so the pool waits for ever. Tasks of task-pool stages are run by Ray at most 4 times (its
`max_retries` default, 3), so for them the bound is at most 2 retries and the 4th start reports the failure; should
Ray give up on a task anyway, Ray Data drops its block (the runner sets `max_errored_blocks=-1`) and the runner
reports the shard from this record.

The record is kept in the GCS's key-value store (what Ray Data and Ray Train keep their own small state in), one
key per shard being worked on, holding the workers that started it (node, pid, worker id): about 100 bytes per
start, two GCS round trips (~2 ms) per shard, no process of its own (a record actor cost 0.5-1.6 s to start per
stage here). A worker that starts a shard for the (retries + 2)-th time returns the shard's failure without doing
it. Why a worker died is read from the GCS too: its exit type and detail in the worker table (what the raylet
recorded: "Worker unexpectedly exits ... killed by the OOM killer", Ray's memory monitor's message), or the death
of its node. A shard's key is deleted when it finishes and the stage's keys when the stage ends.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "curate"
DETAIL_CHARS = 330  # of a worker's exit detail: Ray's own advice that follows the causes is left out


@dataclass(frozen=True)
class Ledger:
    """The record of one stage run's shard starts (plain data: it travels to the workers)."""

    prefix: str  # keys are prefix + shard number

    @staticmethod
    def new(stage: str) -> Ledger:
        return Ledger(f"attempts/{stage}/{uuid.uuid4().hex}/")

    def begin(self, shard: int) -> list[dict[str, Any]]:
        """Record that this worker starts `shard`; returns the workers of its earlier starts in this run."""
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

        key = f"{self.prefix}{shard}"
        earlier = json.loads(_internal_kv_get(key, namespace=NAMESPACE) or b"[]")
        _internal_kv_put(key, json.dumps([*earlier, _this_worker()]), namespace=NAMESPACE)
        return earlier

    def end(self, shard: int) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(f"{self.prefix}{shard}", namespace=NAMESPACE)

    def refuse(self, shard: int) -> None:
        """Mark the last start of `shard` as one that did no work (its retries were used up)."""
        from ray.experimental.internal_kv import _internal_kv_put

        starts = self.history(shard)
        if starts:
            starts[-1]["refused"] = True
            _internal_kv_put(f"{self.prefix}{shard}", json.dumps(starts), namespace=NAMESPACE)

    def in_flight(self) -> list[tuple[int, dict[str, Any]]]:
        """(shard, the worker of its last start) for every shard started and not finished (nor refused)."""
        from ray.experimental.internal_kv import _internal_kv_list

        found = []
        for key in _internal_kv_list(self.prefix, namespace=NAMESPACE):
            shard = int(key.decode()[len(self.prefix) :])
            starts = self.history(shard)
            if starts and not starts[-1].get("refused"):
                found.append((shard, starts[-1]))
        return found

    def history(self, shard: int) -> list[dict[str, Any]]:
        from ray.experimental.internal_kv import _internal_kv_get

        return json.loads(_internal_kv_get(f"{self.prefix}{shard}", namespace=NAMESPACE) or b"[]")

    def clear(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.prefix, del_by_prefix=True, namespace=NAMESPACE)


def _this_worker() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "node": context.get_node_id(), "worker": context.get_worker_id()}


@dataclass
class Attempt:
    shard: int
    number: int  # 1 for the first start of the shard in this run
    allowed: int  # starts allowed: retries + 1
    earlier: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exhausted(self) -> bool:
        return self.number > self.allowed

    def deaths(self) -> str:
        return describe_starts(self.earlier)

    def failure(self, stage: str) -> str:
        return (
            f"stage {stage!r}, shard {self.shard}: started {len(self.earlier)} times and each time its worker died "
            f"before finishing it; not started again (ray.shard_retries: {self.allowed - 1}). A shard that always "
            f"kills its worker is usually over the memory of its node: give the stage more `resources.memory` (so "
            f"fewer workers share a node) or make its shards smaller.\n{self.deaths()}"
        )


def begin(ledger: Ledger, shard: int, retries: int) -> Attempt | None:
    """Record that this worker starts `shard`; None when the record cannot be reached (then nothing is bounded)."""
    try:
        earlier = ledger.begin(shard)
    except Exception:
        return None
    return Attempt(shard, len(earlier) + 1, retries + 1, earlier)


def shard_title(stage: str, shard: int) -> str:
    return f"ray::{stage}:shard-{shard:05d}"


def set_title(stage: str, shard: int, attempt: Attempt | None) -> None:
    """Name the shard in the worker's process title while it works on it (`ps` on a node shows
    ray::score:shard-00042:attempt-1), as Ray names a worker after its task and renames it when the task ends.
    Ray's own title setter; a Ray without it keeps its title (and `wait_stopped` then waits for nothing)."""
    try:
        from ray._raylet import setproctitle
    except ImportError:
        return
    number = f":attempt-{attempt.number}" if attempt is not None else ""
    setproctitle(f"{shard_title(stage, shard)}{number}")


def _wait_left(held: list[tuple[int, str]], timeout_s: float) -> list[int]:
    """On a node: wait until each (pid, title) process has left its shard: exited, a zombie, or renamed (Ray renames
    a worker when its task ends, also when the task was cancelled). Returns the pids still on their shard."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = []
        for pid, title in held:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    zombie = stat.read().rsplit(")", 1)[1].split()[0] == "Z"
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    on_it = cmdline.read().split(b"\0")[0].decode(errors="replace").startswith(title)
            except OSError:
                continue
            if on_it and not zombie:
                busy.append(pid)
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.02)


def wait_stopped(ledger: Ledger, stage: str, timeout_s: float = 10.0) -> list[int]:
    """After a stage was stopped (Ray Data kills or releases its actors and cancels its tasks, all asynchronously):
    wait until no worker is still on one of its shards, so nothing is written after the caller cleans up. Ray's own
    record marks a killed worker dead before its process is gone, and a released actor lives on (idle) until the
    driver exits, so the wait is done on each node by a small task (no CPU) that watches the workers' processes.
    Returns the shards whose worker was still on them at the timeout."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    deadline = time.monotonic() + timeout_s
    watched: set[tuple[str, int, int]] = set()
    left: list[int] = []
    while time.monotonic() < deadline:
        try:
            busy = [(s, w) for s, w in ledger.in_flight() if (w["node"], w["pid"], s) not in watched]
        except Exception:  # the record cannot be read: nothing to wait for
            return left
        if not busy:
            return left
        live = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        by_node: dict[str, list[tuple[int, int]]] = {}
        for shard, worker in busy:
            watched.add((worker["node"], worker["pid"], shard))
            if worker["node"] in live:  # on a lost node nothing runs any more
                by_node.setdefault(worker["node"], []).append((shard, worker["pid"]))
        waits = {
            node: ray.remote(_wait_left)
            .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote([(pid, shard_title(stage, shard)) for shard, pid in held], max(0.0, deadline - time.monotonic()))
            for node, held in by_node.items()
        }
        for node, ref in waits.items():
            try:
                busy_pids = set(ray.get(ref, timeout=max(1.0, deadline - time.monotonic() + 5)))
            except Exception:
                busy_pids = {pid for _, pid in by_node[node]}
            left += [shard for shard, pid in by_node[node] if pid in busy_pids]
    return left


def _exit_record(worker: dict[str, Any]) -> Any:
    """The GCS worker table's record of a worker (exit type and detail once it died), or None."""
    import ray
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    info = accessor.get_worker_info(ray.WorkerID(bytes.fromhex(worker["worker"])))
    return gcs_pb2.WorkerTableData.FromString(info) if info else None


def describe_starts(starts: list[dict[str, Any]]) -> str:
    return "\n".join(f"  start {i}: {death_of(w)}" for i, w in enumerate(starts, 1))


def death_of(worker: dict[str, Any]) -> str:
    """Why a worker died, as the GCS recorded it: its node's death, or the worker's exit type and detail."""
    import ray

    where = f"worker pid {worker['pid']} on node {worker['node'][:8]}"
    for node in ray.nodes():
        if node["NodeID"] == worker["node"] and not node["Alive"]:
            return f"{where}: its node ({node['NodeManagerAddress']}) was lost: {node.get('DeathReasonMessage') or '-'}"
    try:
        from ray.core.generated import common_pb2

        record = _exit_record(worker)
    except Exception as e:  # a private API of Ray's: say what is known
        return f"{where}: died (its exit record could not be read: {e})"
    if record is None or record.is_alive:
        return f"{where}: stopped before finishing (no exit recorded yet)"
    kind = common_pb2.WorkerExitType.Name(record.exit_type)
    detail = record.exit_detail.strip()
    return f"{where}: {kind}: {detail[:DETAIL_CHARS] + ' ...' if len(detail) > DETAIL_CHARS else detail}"
