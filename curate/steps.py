"""Global steps as chains of Ray tasks: the plain data a stage's global step yields and the runner executes.

A global step needs all of its upstream at once (dedup's clustering, a filter's top fraction). Rather than one
task that holds everything, a stage describes it as a generator of *phases*: each phase is a list of independent
tasks (a module-level function and small, picklable arguments, usually paths), and the generator receives the
phase's results (``{task name: the dict its function returned}``) before it yields the next phase. Tasks
exchange data through files under the stage's ``_global/`` folder, never through the driver.

Every task writes its own completion marker, ``_global/_tasks/<phase>/<task>.json``, holding its result, seconds,
peak resident memory and where it ran. A re-run replays the generator from the start: finished tasks are not run
again (their results are read back from the markers), so a killed run resumes inside the global step and a lost
worker or node costs only the tasks it was running. Tasks must therefore be deterministic functions of their
arguments and of files written by earlier phases, and write their files atomically.

Why a generator and not a declared graph (Ray DAGs, datatrove's executor ``depends=``): the shape of the later
phases depends on earlier results (how many clusters are over the memory cap, how many label-propagation rounds
the pair graph needs), and a generator says that in plain Python.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from curate import storage

MARKERS = "_tasks"


@dataclass(frozen=True)
class GlobalTask:
    """One Ray task of a global step. ``name`` is unique inside its phase and names its marker. ``num_cpus``
    replaces the stage's for this task (a single task between wide phases, such as k-means, may take more)."""

    name: str
    function: Callable[..., dict[str, Any]]
    args: tuple[Any, ...] = ()
    num_cpus: float | None = None


@dataclass(frozen=True)
class GlobalPhase:
    """Tasks that can run at once; the next phase starts when all of them have their markers."""

    name: str
    tasks: tuple[GlobalTask, ...]


PhaseResults = dict[str, dict[str, Any]]
# what a stage's `global_step` returns: yields phases, receives their results, returns the step's summary
GlobalSteps = Generator[GlobalPhase, PhaseResults, dict[str, Any]]


def marker_folder(global_uri: str, phase: str) -> str:
    return storage.join(global_uri, MARKERS, phase)


def marker_uri(global_uri: str, phase: str, task: str) -> str:
    return storage.join(marker_folder(global_uri, phase), task + ".json")


def done_tasks(global_uri: str, phase: str) -> set[str]:
    """Names of the phase's tasks that have a marker (one listing, not one request per task)."""
    names = storage.list_names(marker_folder(global_uri, phase))
    return {n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".tmp-")}


def read_result(global_uri: str, phase: str, task: str) -> dict[str, Any]:
    return storage.read_json(marker_uri(global_uri, phase, task))["result"]


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: ``clear_refs`` 5), so a reused Ray worker reports the
    peak of the current task only. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM; since the last reset_peak_rss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so a reused worker starts its next task small
    and its peak RSS measures that task. (No gc.collect: measured 0.1 s a call in a worker holding PyTorch.)"""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_task(global_uri: str, phase: str, task: GlobalTask) -> dict[str, Any]:
    """Run one task and write its marker (the worker side; the runner wraps it in a Ray task)."""
    release_memory()
    reset = reset_peak_rss()
    started = time.perf_counter()
    try:
        result = task.function(*task.args) or {}
    finally:
        release_memory()
    record = {
        "phase": phase,
        "task": task.name,
        "result": result,
        "seconds": round(time.perf_counter() - started, 4),
        "peak_rss_bytes": peak_rss(),
        "peak_rss_of": "task" if reset else "worker process",
        "node": _node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.write_json(marker_uri(global_uri, phase, task.name), record)
    return record


def _node_id() -> str:
    """The Ray node this task ran on (hosts of a one-machine test cluster share one hostname)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    except Exception:  # a record field, never a reason to fail the task
        return socket.gethostname()


def task_records(global_uri: str) -> dict[str, list[dict[str, Any]]]:
    """Every marker of a global step, by phase (for reports and benchmarks)."""
    out: dict[str, list[dict[str, Any]]] = {}
    root = storage.join(global_uri, MARKERS)
    for phase in storage.list_names(root):
        folder = storage.join(root, phase)
        names = [n for n in storage.list_names(folder) if n.endswith(".json")]
        out[phase] = [storage.read_json(storage.join(folder, n)) for n in names]
    return out


# -- small helpers for the files tasks exchange ------------------------------------------------------------


def write_array(uri: str, array: Any) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    storage.write_atomic(uri, buffer.getvalue())


def read_array(uri: str) -> Any:
    import numpy as np

    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
