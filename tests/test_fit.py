"""What a stage's workers ask of a node, and which clusters can hold them (curate.fit), the settings of faults and
stalls (ray.*, resources.*), and signals turned into `Interrupted` (curate.interrupt). No Ray cluster: the clusters
are described as `ray.nodes()` and an autoscaler's node types describe them; tests/test_faults.py runs it all on a
real multi-node Ray."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from curate import fit, interrupt
from curate.config import ConfigError, Resources
from curate.pipeline import load_pipeline

GIB = 2**30
SMALL = fit.Capacity("node 10.0.0.1", {"CPU": 1.0, "memory": 8.0 * GIB, "node:10.0.0.1": 1.0})
BIG = fit.Capacity("node 10.0.0.2", {"CPU": 16.0, "memory": 64.0 * GIB})
GPU = fit.Capacity("node 10.0.0.3", {"CPU": 4.0, "GPU": 1.0, "memory": 32.0 * GIB, "accelerator_type:T4": 1.0})
CLUSTER = fit.Cluster((SMALL, BIG, GPU))


def ask(**resources) -> dict[str, float]:
    return fit.request_of(Resources(**resources))


def test_a_request_is_what_ray_reserves():
    assert ask() == {"CPU": 1.0}  # num_gpus 0 is not asked, as Ray drops it
    assert ask(num_cpus=2, num_gpus=0.5, memory=GIB, accelerator_type="A100", custom={"ssd": 1}) == {
        "CPU": 2.0,
        "GPU": 0.5,
        "memory": float(GIB),
        "accelerator_type:A100": 0.001,  # Ray's own convention for accelerator_type
        "ssd": 1.0,
    }
    assert fit.ray_options(Resources(num_cpus=3, concurrency=2, batch_size=8)) == {"num_cpus": 3.0, "num_gpus": 0.0}


def test_each_field_no_node_can_meet_is_named_with_the_largest_node():
    assert fit.misfits(ask(num_cpus=16), CLUSTER) == []
    assert fit.misfits(ask(num_cpus=32), CLUSTER) == [
        ("num_cpus", "asks 32 CPUs per worker, but the largest node 10.0.0.2 has 16 CPUs")
    ]
    assert fit.misfits(ask(num_gpus=2), CLUSTER) == [
        ("num_gpus", "asks 2 GPUs per worker, but the largest node 10.0.0.3 has 1 GPU")
    ]
    assert fit.misfits(ask(num_gpus=1), fit.Cluster((SMALL, BIG))) == [
        ("num_gpus", "asks 1 GPU per worker, but no node has a GPU")
    ]
    assert fit.misfits(ask(memory=100 * GIB), CLUSTER) == [
        ("memory", "asks 100.0 GiB of memory per worker, but the largest node 10.0.0.2 has 64.0 GiB of memory")
    ]
    assert fit.misfits(ask(num_gpus=1, accelerator_type="A1OO"), CLUSTER) == [
        ("accelerator_type", "asks for accelerator type 'A1OO', but the nodes' accelerator types are T4")
    ]
    assert fit.misfits(ask(custom={"tpu": 4}), CLUSTER) == [
        ("custom.tpu", "asks 4 of resource 'tpu' per worker, but no node has resource 'tpu'")
    ]
    # each part fits some node, none holds all of it at once
    ((field, problem),) = fit.misfits(ask(num_cpus=8, num_gpus=1), CLUSTER)
    assert field == "" and problem == (
        "asks 8 CPUs and 1 GPU per worker together, but no node has all of it: the nodes with 1 GPU have at most 4 CPUs"
    )
    assert fit.misfits(ask(), fit.Cluster(())) == [("", "the cluster has no live node")]


def test_node_types_an_autoscaler_can_add_count_as_nodes():
    types = (fit.Capacity("node type gpu-a100 (autoscaler: up to 8)", {"CPU": 12.0, "GPU": 8.0}),)
    grows = fit.Cluster((SMALL,), types, autoscaler=True)
    assert fit.misfits(ask(num_cpus=8, num_gpus=8), grows) == []
    assert fit.misfits(ask(num_cpus=24), grows) == [
        ("num_cpus", "asks 24 CPUs per worker, but the largest node type gpu-a100 has 12 CPUs")
    ]
    # an autoscaler that does not publish its node types may add one that fits: not refused before work
    assert fit.misfits(ask(num_cpus=24), fit.Cluster((SMALL,), autoscaler=True)) == []
    assert "an autoscaler runs but publishes no node types" in fit.Cluster((SMALL,), autoscaler=True).describe()


def test_problems_name_the_file_line_and_field(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text(
        f"""\
name: fit
output: {tmp_path / "run"}
stages:
  - kind: local
    name: ingest
    path: {tmp_path}
  - kind: local
    name: second
    path: {tmp_path}
    resources:
      num_cpus: 4
      memory: 1099511627776
"""
    )
    pipeline = load_pipeline(path)
    small = fit.Cluster((SMALL,))
    assert fit.check_stages(pipeline, pipeline.stages, small) == [
        f"{path}:11: stages[1].resources.num_cpus: stage 'second' asks 4 CPUs per worker, but the largest node "
        f"10.0.0.1 has 1 CPU",
        f"{path}:12: stages[1].resources.memory: stage 'second' asks 1024.0 GiB of memory per worker, but the "
        f"largest node 10.0.0.1 has 8.0 GiB of memory",
    ]


def test_fault_and_stall_settings_are_checked_before_work(tmp_path):
    def problems(ray: str, resources: str = "{}") -> str:
        path = tmp_path / "p.yaml"
        path.write_text(
            f"name: p\noutput: {tmp_path / 'run'}\nray: {ray}\nstages:\n"
            f"  - kind: local\n    path: {tmp_path}\n    resources: {resources}\n"
        )
        try:
            load_pipeline(path)
        except ConfigError as e:
            return str(e)
        return ""

    assert problems("{stall_timeout_s: 30, wait_for_autoscaler: true, shard_retries: 0}") == ""
    assert "p.yaml:3: ray.stall_timeout_s: Input should be greater than 0" in problems("{stall_timeout_s: 0}")
    assert "ray.shard_retries: Input should be greater than or equal to 0" in problems("{shard_retries: -1}")
    assert "ray.wait_for_autoscalr: unknown key" in problems("{wait_for_autoscalr: true}")
    custom = problems("{}", "{custom: {CPU: 2}}")
    assert "stages[0].resources.custom: Value error, CPU: set by Ray itself" in custom
    assert "stages[0].resources.accelerator_type" in problems("{}", "{accelerator_type: ''}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_raise_interrupted_even_when_sigint_was_ignored(signum):
    """A job started with `&` in a script inherits SIGINT ignored; inside `interruptible` it stops the run anyway,
    and the handlers in place before come back after."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(interrupt.Interrupted) as stopped, interrupt.interruptible():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises at once, in this (the main) thread
        assert stopped.value.signum == signum and stopped.value.exit_code == 128 + signum
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_another_thread_stops_the_main_thread_while_it_waits():
    """The watchdog's way: the main thread, blocked in a wait (as in Ray Data's result queue), raises at once."""
    assert not interrupt.stop_main_thread("nothing to stop")  # outside `interruptible`: nothing is done
    threading.Timer(0.2, interrupt.stop_main_thread, ["stalled"]).start()
    started = time.monotonic()
    with pytest.raises(interrupt.Interrupted) as stopped, interrupt.interruptible():
        threading.Event().wait(30)
    assert stopped.value.signum is None and stopped.value.reason == "stalled" and stopped.value.exit_code == 1
    assert time.monotonic() - started < 5
