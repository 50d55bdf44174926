"""The stall watchdog: a stage that finishes no shard for `ray.stall_timeout_s` while Ray holds requests of the
stage's shape that no node can meet is stopped with a message naming them, instead of waiting for ever.

This is what happens when the cluster shrinks under a running stage (the only node big enough for its workers is
lost, and the restarted actor's request stays pending) or when an autoscaler never adds the node a request needs.
The pending requests are read from the GCS with `ray.autoscaler.v2.sdk.get_cluster_status`: the requests every
raylet reports as waiting (feasible or not), which needs neither the dashboard nor an autoscaler. Only requests
equal to the stage's own (curate.fit.request_of) count, since the list is the whole cluster's and other jobs may
wait for their own nodes. Whether a node could hold one is decided as before the stage (curate.fit), against the
cluster as it is now; with `ray.wait_for_autoscaler: true` a request that a node type of the autoscaler could hold
is waited for. A stall with no such request (a long task, a hung download) is logged, never ended: only Ray's own
demands are evidence that the wait cannot end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from curate import fit, interrupt


def pending_requests() -> list[tuple[dict[str, float], int]]:
    """(resource request, how many) that Ray's raylets report as waiting for a node, cluster-wide."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    return [
        ({k: float(v) for k, v in entry.bundle.items() if v}, int(entry.count))
        for demand in status.resource_demands.ray_task_actor_demand
        for entry in demand.bundles_by_count
    ]


class Watchdog:
    """Runs beside a stage (a thread); the stage calls `tick()` whenever a shard finishes."""

    def __init__(
        self,
        stage: str,
        request: dict[str, float],
        explain: Callable[[fit.Cluster], list[str]],
        timeout_s: float,
        wait_for_autoscaler: bool = False,
        log: Callable[[str], None] = print,
    ):
        self.stage, self.request, self.explain = stage, request, explain
        self.timeout_s, self.wait_for_autoscaler, self.log = timeout_s, wait_for_autoscaler, log
        self.poll_s = min(max(timeout_s / 4, 0.2), 5.0)
        self._last = time.monotonic()
        self._reported = 0.0  # when the last "no progress" line was written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"curate-watchdog-{stage}", daemon=True)

    def tick(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> Watchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle < self.timeout_s or time.monotonic() - self._reported < self.timeout_s:
                continue
            try:
                message, final = self.verdict(idle)
            except Exception as e:  # the GCS did not answer: look again at the next poll
                self.log(f"[{self.stage}] watchdog: could not read Ray's pending requests: {e}")
                continue
            if not final:
                self._reported = time.monotonic()
                self.log(message)
                continue
            if not self._stop.is_set() and interrupt.stop_main_thread(message):
                return

    def verdict(self, idle: float) -> tuple[str, bool]:
        """A message about the stall, and whether it ends the run."""
        waiting = [(shape, count) for shape, count in pending_requests() if shape == self.request]
        cluster = fit.read_cluster()
        live = fit.Cluster(cluster.nodes)
        if not waiting or not fit.misfits(self.request, live):  # nothing of ours is stuck for want of a node
            return (
                f"[{self.stage}] no shard reported back for {idle:.0f} s; Ray holds no request of this stage that "
                f"no node can meet, so still waiting (a long or stuck task?)",
                False,
            )
        count = sum(c for _, c in waiting)
        shape = fit.describe_offer(self.request, self.request)
        # a node type the autoscaler publishes holds it, or an autoscaler runs that publishes none (it may)
        addable = any(fit.holds(t.resources, self.request) for t in cluster.node_types) or (
            cluster.autoscaler and not cluster.node_types
        )
        if addable and self.wait_for_autoscaler:
            return (
                f"[{self.stage}] no shard reported back for {idle:.0f} s; {count} worker(s) ({shape}) wait for a "
                f"node the autoscaler can add; still waiting (ray.wait_for_autoscaler: true)",
                False,
            )
        reasons = "\n  ".join(self.explain(live))
        hint = (
            "; set ray.wait_for_autoscaler: true to keep waiting for the autoscaler"
            if addable or cluster.autoscaler
            else ""
        )
        return (
            f"stage {self.stage!r} stopped: no shard reported back for {idle:.0f} s while Ray holds {count} request(s) "
            f"of its workers ({shape}) that no node of the cluster ({cluster.describe()}) can meet:\n  {reasons}\n"
            f"Finished shards are kept: run the same command on a cluster with such a node (or with smaller "
            f"resources) to resume{hint}.",
            True,
        )
