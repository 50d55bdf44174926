"""The dedup global step as Ray task phases: the same decisions as the single-process step, on one worker and on
several, on a real multi-node Ray with a worker killed during the search, and after the driver is killed in
each sub-step. Embeddings are synthetic (planted copies, a cluster of near-identical rows above the search cap,
exact copies, rows without an embedding): the global step, not the model, is under test.

Runs through `curate run` in a subprocess use `precision: fp32`, so their fresh Ray workers need not import
PyTorch (4 CPU seconds each here); the in-process runs use the default (bf16 on this CPU)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _dedup_support import (  # noqa: F401 (two_nodes: a fixture)
    dedup_in_process,
    dedup_only_pipeline,
    earlier_run,
    index_rows,
    markers,
    new_batch,
    planted_embeddings,
    read_decisions,
    run_dedup_only,
    stage_rows,
    start_driver,
    two_nodes_cluster,
    write_embedding_stage,
    write_sscd_stage,
)

from curate.dedup import single
from curate.dedup.layout import Where
from curate.runfolder import RunDir
from curate.stages.dedup import DedupConfig

ROWS, GIANT, SHARD_ROWS = 2400, 450, 150
PLANTED = {"shards": 16, "copies": 63, "missing": 46}
# sizes that make this small run take every path: 4 map groups, clusters over the cap (the 450 near-identical
# rows: > 300) searched in keep-order blocks, 2 pair-graph partitions
DISTRIBUTED = {
    "single_process_rows": 0,
    "map_rows": 600,
    "search_rows": 300,
    "graph_rows": 1200,
    "analysis_clusters": 8,
}


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    return planted_embeddings(ROWS, GIANT)


def _run_folder(root: Path, x: np.ndarray) -> Path:
    run = root / "run"
    assert write_sscd_stage(run, x, SHARD_ROWS) == PLANTED
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("no-images")  # the ingest stage is never run here


@pytest.fixture(scope="module")
def references(tmp_path_factory, embeddings):
    """The single-process global step's decisions (curate.dedup.single, in this process), per precision."""
    run = _run_folder(tmp_path_factory.mktemp("single"), embeddings)
    sscd = RunDir(str(run)).stage("sscd")
    shards = [(s.shard, s.rows) for s in sscd.shard_stats()]
    tables = {}
    for precision in ("auto", "fp32"):
        settings = DedupConfig(kind="dedup", precision=precision, **DISTRIBUTED).settings()
        where = Where(sscd.uri, str(run / precision / "_global"), str(run / precision / "_report"))
        single.run(where, settings, shards)
        tables[precision] = pa.concat_tables([pq.read_table(where.decisions(s)) for s, _ in shards])
    return tables


def _assert_same(table: pa.Table, reference: pa.Table) -> None:
    for column in reference.column_names:  # key, cluster, keep, dup_of, similarity, reason, status
        assert table[column].equals(reference[column]), column


def test_reference_finds_what_was_planted(references):
    reference = references["auto"]
    reasons = dict(zip(*np.unique(reference["reason"].to_numpy(zero_copy_only=False), return_counts=True), strict=True))
    assert reasons["exact_duplicate"] == PLANTED["copies"] and reasons["not_ok"] == PLANTED["missing"]
    rows = reference.to_pylist()
    where = {r["key"]: i for i, r in enumerate(rows)}
    assert len([r for r in rows[:GIANT] if r["keep"]]) <= 10  # 450 near-identical rows: a few survivors at most
    near = [r for r in rows if r["reason"] == "near_duplicate"]
    assert len(near) > GIANT + 100  # the giant cluster and most planted copies
    # pairs split by a cluster boundary: the copy's nearest centroid is not its original's
    assert len([r for r in near if rows[where[r["dup_of"]]]["cluster"] != r["cluster"]]) > 20
    removed = {p: int((~t["keep"].to_numpy(zero_copy_only=False)).sum()) for p, t in references.items()}
    assert abs(removed["fp32"] - removed["auto"]) <= 0.01 * removed["auto"]  # other products, other partitions


@pytest.mark.slow
@pytest.mark.parametrize(
    "resources", [{"num_cpus": 1, "concurrency": 1}, {"num_cpus": 1}], ids=["one-worker", "two-workers"]
)
def test_distributed_decisions_equal_single_process(tmp_path, embeddings, images, references, resources, ray_cluster):
    run = _run_folder(tmp_path, embeddings)
    record = run_dedup_only(run, images, {**DISTRIBUTED, "resources": resources})["dedup"]
    assert record["rows"] == ROWS
    _assert_same(read_decisions(run), references["auto"])
    folder = run / "dedup" / "_global"
    assert json.loads((folder / "_DONE.json").read_text())["path"] == "distributed"
    plan = json.loads((folder / "r0" / "plan.json").read_text())
    assert plan["giant"] and all(c["blocks"] >= 2 for c in plan["giant"])  # near-identical rows: in blocks
    tasks = {p.name: len(list(p.glob("*.json"))) for p in (folder / "_tasks").iterdir()}
    assert tasks["scan"] == 4 and tasks["r0-split"] == len(plan["giant"]) and tasks["prune"] == 2
    records = [json.loads(p.read_text()) for p in (folder / "_tasks").glob("*/*.json")]
    assert all(0 < r["peak_rss_bytes"] < 4 * 2**30 for r in records)
    report = json.loads((run / "dedup" / "_report" / "dedup_report.json").read_text())
    removed = int((~read_decisions(run)["keep"].to_numpy(zero_copy_only=False)).sum()) - PLANTED["missing"]
    assert report["removed"] == removed and report["threshold_analysis"][0]["items"] > 0


def _fp32_pipeline(tmp_path: Path, run: Path, images: Path, resources: dict) -> Path:
    """The fp32 reference's settings, in 2 map groups (grouping and task sizes never change a decision)."""
    pipeline = tmp_path / "pipeline.yaml"
    settings = {**DISTRIBUTED, "map_rows": 1200, "precision": "fp32", "resources": resources}
    pipeline.write_text(dedup_only_pipeline(run, images, settings))
    return pipeline


def _workers(cluster) -> list[int]:
    """PIDs of the worker processes of this cluster's raylets (their children), never anyone else's."""
    pids = []
    for node in cluster.list_all_nodes():
        for raylet in node.all_processes.get("raylet", []):
            pid = raylet.process.pid
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    pids += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    continue
    return pids


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def _kill_search_worker(cluster) -> int | None:
    for pid in _workers(cluster):
        if _title(pid).startswith("ray::dedup:r0-search:"):  # Ray titles a worker ray::<task name>
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


@pytest.mark.slow
def test_multi_node_resume_after_the_driver_is_killed_in_each_sub_step(
    tmp_path, embeddings, images, references, two_nodes
):
    """On a two-node Ray, SIGKILL the `curate run` driver as soon as a sub-step has finished its first task; in
    the search step first SIGKILL a worker running a search task (Ray runs the task again). Each run resumes
    where the last was killed: tasks with markers are not run again, and the decisions are the single-process
    ones."""
    run = _run_folder(tmp_path, embeddings)
    pipeline = _fp32_pipeline(tmp_path, run, images, {"num_cpus": 1})
    folder = run / "dedup" / "_global"
    kept: dict[str, dict[str, str]] = {}
    killed_worker = None
    for phase in ("exact", "r0-kmeans", "r0-assign", "r0-search", "cc0", "greedy"):
        driver = start_driver(pipeline, two_nodes.address)
        deadline = time.monotonic() + 180
        while driver.poll() is None and time.monotonic() < deadline:
            if phase == "r0-search" and killed_worker is None:
                killed_worker = _kill_search_worker(two_nodes)
            elif markers(folder, phase):
                break
            time.sleep(0.01)
        driver.send_signal(signal.SIGKILL)
        output = driver.communicate()[0]
        assert driver.returncode == -signal.SIGKILL, output  # killed, not finished
        kept[phase] = markers(folder, phase)
        assert kept[phase], f"no task of {phase} finished before the kill:\n{output}"
        assert not (folder / "_DONE.json").exists()
    assert killed_worker is not None, "no search task was seen running"
    driver = start_driver(pipeline, two_nodes.address)
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output
    _assert_same(read_decisions(run), references["fp32"])
    for phase, texts in kept.items():  # finished before a kill: never run again
        after = markers(folder, phase)
        assert all(after[name] == text for name, text in texts.items()), phase
    search = [json.loads(p.read_text()) for p in (folder / "_tasks" / "r0-search").glob("*.json")]
    assert killed_worker not in {r["pid"] for r in search}  # its task finished in another worker
    records = [json.loads(p.read_text()) for p in (folder / "_tasks").glob("*/*.json")]
    assert len({r["node"] for r in records}) == 2  # both nodes ran tasks


# -- a run against an earlier run's dedup index (`against:`; tests/test_dedup_against.py has the rest) ------------


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    from curate.dedup.synthetic import World

    return earlier_run(tmp_path_factory.mktemp("A") / "run", World(topics=40))


# small enough that the search of the reference takes every path: probe groups, tasks over touched clusters, and
# clusters whose index rows and probe entries exceed search_rows searched in blocks
AGAINST_DISTRIBUTED = {"single_process_rows": 0, "map_rows": 1000, "search_rows": 800, "graph_rows": 3000,
                       "analysis_clusters": 4}  # fmt: skip


@pytest.mark.slow
def test_multi_node_against_an_index_resumes_after_the_driver_is_killed(tmp_path, earlier, two_nodes):
    """On a two-node Ray: a run against run A's index through `curate run`, as phases of Ray tasks (probe groups,
    search tasks over the touched clusters only, a block task for a large cluster), its driver SIGKILLed as soon
    as the reference search has finished a task, then run again: finished tasks are not run again, and the
    decisions, row for row, and the index are those of the same run decided in one task in this process."""
    import yaml

    run_a, batch_a = earlier
    shards = stage_rows([new_batch(batch_a.world, batch_a).vectors(s) for s in range(3)], "b", seed=1)
    against = [{"name": "a", "path": str(run_a / "dedup"), "search": "clusters"}]
    settings = {**AGAINST_DISTRIBUTED, "against": against, "precision": "fp32", "resources": {"num_cpus": 1}}
    single_run, run = tmp_path / "single", tmp_path / "run"
    for folder in (single_run, run):
        write_embedding_stage(folder, shards)
    dedup_in_process(single_run, against=against, precision="fp32", search_rows=800)
    images = tmp_path / "no-images"
    images.mkdir()
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(dedup_only_pipeline(run, images, settings))
    folder = run / "dedup" / "_global"
    driver = start_driver(pipeline, two_nodes.address)
    deadline = time.monotonic() + 240
    while driver.poll() is None and time.monotonic() < deadline and not markers(folder, "x0-search"):
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    output = driver.communicate()[0]
    assert driver.returncode == -signal.SIGKILL, output
    kept = {phase: markers(folder, phase) for phase in ("x0-probe", "x0-search")}
    assert kept["x0-search"] and not (folder / "_DONE.json").exists()
    driver = start_driver(pipeline, two_nodes.address)
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output
    one, resumed = read_decisions(single_run), read_decisions(run)
    for column in one.column_names:
        assert one[column].equals(resumed[column]), column
    for phase, texts in kept.items():
        after = markers(folder, phase)
        assert all(after[name] == text for name, text in texts.items()), phase
    records = [json.loads(p.read_text()) for p in folder.glob("_tasks/*/*.json")]
    assert len({r["node"] for r in records}) == 2
    assert yaml.safe_load(pipeline.read_text())["stages"][2]["against"][0]["name"] == "a"
    done = json.loads((folder / "_DONE.json").read_text())
    assert done["path"] == "distributed" and done["against_removed"] > 250
    assert {"x0-probe", "x0-plan", "x0-search", "x-resolve", "index-rows", "index-compact"} <= set(done["phases"])
    plan = json.loads((folder / "against" / "x00000" / "plan.json").read_text())
    assert plan["blocks"] and sum(plan["touched"]) < plan["clusters"] * len(plan["touched"])
    for stage in (single_run / "dedup", run / "dedup"):
        assert sorted(index_rows(stage)["key"].to_pylist()) == sorted(r["key"] for r in one.to_pylist() if r["keep"])
