"""The dedup products in torch on a device (curate.dedup.products, ``Vectors.device``) make exactly the CPU path's
decisions. Here the device is the CPU (``device="cpu"`` runs the same torch code a GPU runs), against the current
numpy/oneDNN path, on the test sets of tests/test_dedup_distributed.py: planted copies, a cluster of near-identical
rows above the search cap, exact copies and rows without an embedding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _dedup_support import planted_embeddings, write_sscd_stage

from curate.dedup import distributed, single
from curate.dedup.cluster import DedupParams, dedup, lloyd_sums, normalize
from curate.dedup.layout import Where
from curate.dedup.products import (
    Vectors,
    _int8_centroids,
    _int8_scores,
    _quantise_rows,
    _top_int8,
    _top_torch,
    nearest,
    quantise_rows,
)
from curate.runfolder import RunDir
from curate.stages.dedup import DedupConfig

ROWS, GIANT, SHARD_ROWS = 2400, 450, 150
# as tests/test_dedup_distributed.py: 4 map groups, the 450 near-identical rows over the search cap (in blocks)
DISTRIBUTED = {
    "single_process_rows": 0,
    "map_rows": 600,
    "search_rows": 300,
    "graph_rows": 1200,
    "analysis_clusters": 8,
}
FIELDS = ("keep", "dup_of", "similarity", "cluster")


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    return planted_embeddings(ROWS, GIANT)


def test_int8_quantisation_and_top_k_in_torch_are_numpys():
    """The int8 scores are exact integers, so torch on a GPU chooses exactly what numpy chooses on a CPU, ties
    (equal scores) included: both take the first column. The quantised rows are bit-identical (torch's
    ``63.0 / tensor`` is a reciprocal times 63: it moved 3% of such rows by one step)."""
    import torch

    rng = np.random.default_rng(0)
    many = normalize(rng.standard_normal((5_000, 512)).astype(np.float16))
    assert np.array_equal(_quantise_rows(torch.from_numpy(many)).numpy(), quantise_rows(many))
    rows = normalize(rng.standard_normal((300, 64)))
    centroids = normalize(rng.standard_normal((37, 64)))
    centroids[20] = centroids[3]  # equal columns: every row ties between them
    ct, k = _int8_centroids(centroids)
    expected = _top_int8(rows, ct, k, 3)
    device_ct = ct.T.contiguous().T  # the device path's column-major layout
    got = _top_torch(_int8_scores(torch.from_numpy(rows), device_ct, k), 3).numpy()
    assert np.array_equal(got, expected)
    assert {3, 20} & set(got[:, 0].tolist()) and 20 not in got[got[:, 1] == 3, 0]  # the tie goes to column 3


def test_lloyd_sums_on_a_device_are_bit_identical():
    rng = np.random.default_rng(1)
    x = normalize(rng.standard_normal((5000, 32)))
    labels = rng.integers(0, 40, len(x))
    host_sums, host_counts = lloyd_sums(x, labels, 40)
    device_sums, device_counts = lloyd_sums(Vectors.of(x, int8=True, device="cpu"), labels, 40)
    assert np.array_equal(host_sums, device_sums) and np.array_equal(host_counts, device_counts)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_in_memory_dedup_with_torch_products_decides_as_the_cpu_path(embeddings, precision):
    """The in-memory algorithm (the single-process step) over the same rows; block_rows 128 sends the 450
    near-identical rows through the tiled scan, the rest through the batched small-cluster search."""
    params = DedupParams(precision=precision, block_rows=128)
    cpu = dedup(embeddings, params=params)
    device = dedup(embeddings, params=replace(params, device="cpu"))
    for field in FIELDS:
        assert np.array_equal(getattr(device, field), getattr(cpu, field), equal_nan=True), field
    assert np.array_equal(device.pairs.keys(ROWS), cpu.pairs.keys(ROWS))
    assert np.array_equal(device.pairs.sim, cpu.pairs.sim)
    assert (~cpu.keep).sum() > GIANT  # the giant cluster and planted copies are removed: decisions to compare


def test_dense_cluster_tiles_give_the_same_first_neighbours():
    """A cluster of near-identical rows fills whole tiles with candidates (the running-count path); on a device
    only rows with a candidate cross back, which must not change which neighbours each row keeps."""
    from curate.dedup.products import earlier_pairs

    rng = np.random.default_rng(3)
    x = normalize(rng.standard_normal(64) + 0.015 * rng.standard_normal((2500, 64)))
    x[::7] = normalize(rng.standard_normal((len(x[::7]), 64)))  # rows without any neighbour
    members = np.arange(len(x))
    cpu = earlier_pairs(Vectors.of(x), members, 0.75, quota=33, block_rows=1024)
    device = earlier_pairs(Vectors.of(x, device="cpu"), members, 0.75, quota=33, block_rows=1024)
    assert len(cpu[0]) > 30 * 2000
    for a, b in zip(cpu, device, strict=True):
        assert np.array_equal(a, b)


def test_nearest_on_a_device_takes_every_precision():
    x = normalize(np.random.default_rng(2).standard_normal((500, 64)))
    centroids = x[:20]
    for precision in ("auto", "bf16", "fp32"):
        cpu = nearest(Vectors.for_precision(x, precision), centroids, 2)
        device = nearest(Vectors.for_precision(x, precision, "cpu"), centroids, 2)
        assert (device[:, 0] == cpu[:, 0]).mean() > 0.99, precision  # bf16/fp32 may differ on near ties only
    int8 = nearest(Vectors.of(x, int8=True), centroids, 2)  # the CPU's int8 products: exactly the same choices
    assert np.array_equal(nearest(Vectors.for_precision(x, "auto", "cpu"), centroids, 2), int8)


def _drive(step) -> dict:
    """A global step's phases run in this process, task by task, as the runner's Ray tasks would run them."""
    results = None
    try:
        while True:
            phase = step.send(results)
            results = {t.name: t.function(*t.args) for t in phase.tasks}
    except StopIteration as done:
        return done.value


def test_distributed_step_with_torch_products_decides_as_the_single_process_cpu_path(tmp_path: Path, embeddings):
    run = tmp_path / "run"
    write_sscd_stage(run, embeddings, SHARD_ROWS)
    sscd = RunDir(str(run)).stage("sscd")
    shards = [(s.shard, s.rows) for s in sscd.shard_stats()]
    settings = DedupConfig(kind="dedup", **DISTRIBUTED).settings()
    reference = Where(sscd.uri, str(tmp_path / "single" / "_global"), str(tmp_path / "single" / "_report"))
    single.run(reference, settings, shards)  # the CPU path (numpy / oneDNN products), as the stage runs it
    on_device = replace(settings, params=replace(settings.params, device="cpu"))
    where = Where(sscd.uri, str(tmp_path / "torch" / "_global"), str(tmp_path / "torch" / "_report"))
    summary = _drive(distributed.plan(on_device, where, shards, embeddings.shape[1]))
    assert summary["path"] == "distributed"
    for s, _ in shards:
        got, expected = pq.read_table(where.decisions(s)), pq.read_table(reference.decisions(s))
        for column in expected.column_names:  # key, cluster, keep, dup_of, similarity, reason, status
            assert got[column].equals(expected[column]), (s, column)
    table = pa.concat_tables([pq.read_table(where.decisions(s)) for s, _ in shards])
    assert (~table["keep"].to_numpy(zero_copy_only=False)).sum() > GIANT


def test_the_task_decides_the_device_never_the_driver():
    import torch

    assert DedupParams().product_device() is None  # the stage gives its tasks no GPU
    assert DedupParams(gpus=1, gpu=False).product_device() is None  # gpu: false
    assert DedupParams(gpus=1).product_device() == ("cuda" if torch.cuda.is_available() else None)
    assert DedupParams(device="cpu").product_device() == "cpu"
    params = DedupConfig(kind="dedup", resources={"num_gpus": 0.5}).params()
    assert params.gpus == 0.5 and params.gpu is None
