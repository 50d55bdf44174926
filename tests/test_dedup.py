"""The dedup algorithm against exact brute force, SD3's greedy rule, and the dedup stage in a real run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _dedup_support import ONNX_SSCD, run_dedup_pipeline

from curate.dedup.cluster import (
    DedupParams,
    Pairs,
    brute_force_pairs,
    dedup,
    default_clusters,
    exact_groups,
    greedy,
    pair_recall,
    planted_vectors,
)
from curate.stages.dedup import keep_rank


def test_clustered_search_matches_brute_force_with_defaults():
    x, _ = planted_vectors(20_000, seed=3)
    truth = brute_force_pairs(x, 0.75)
    result = dedup(x, params=DedupParams(threshold=0.75))
    assert len(truth) > 1000
    assert pair_recall(result.pairs, truth, len(x)) >= 0.99
    # every pair found is a true pair (the in-cluster search is exact), with the same similarity
    found = dict(zip(result.pairs.keys(len(x)).tolist(), result.pairs.sim.tolist(), strict=True))
    reference = dict(zip(truth.keys(len(x)).tolist(), truth.sim.tolist(), strict=True))
    assert set(found) <= set(reference)
    assert max(abs(found[k] - reference[k]) for k in found) < 1e-4
    # the greedy pass over brute-force pairs and over clustered pairs removes (almost) the same rows
    keep_truth, _, _ = greedy(len(x), truth, np.arange(len(x)))
    assert abs(int((~result.keep).sum()) - int((~keep_truth).sum())) <= 0.01 * (~keep_truth).sum()


def test_bf16_candidates_give_exactly_the_float32_pairs():
    """bf16 products only pick candidates (margin 0.01); pairs within 0.005 of the threshold on both sides
    come out exactly as float32 brute force finds them, with float32 similarities."""
    from curate.dedup.cluster import normalize, range_search_members
    from curate.dedup.products import Vectors

    rng = np.random.default_rng(5)
    base = normalize(rng.standard_normal((3000, 512)))
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise = normalize(noise - (noise * base).sum(1, keepdims=True) * base)
    target = rng.uniform(0.745, 0.755, (len(base), 1)).astype(np.float32)
    target = np.where(np.abs(target - 0.75) < 2e-4, target + 5e-4, target)  # no float32 rounding ties
    x = np.concatenate([base, normalize(target * base + np.sqrt(1 - target**2) * noise)])
    truth = brute_force_pairs(x, 0.75)
    assert 1000 < len(truth) < 2000  # about half the planted pairs are above the threshold
    everyone = np.arange(len(x))
    for vectors in (Vectors.of(x, bf16=True), Vectors.of(x, bf16=False)):
        found = range_search_members(vectors, everyone, 0.75, block_rows=1024)
        assert sorted(found.keys(len(x)).tolist()) == sorted(truth.keys(len(x)).tolist())
        order, reference = np.argsort(found.keys(len(x))), np.argsort(truth.keys(len(x)))
        assert np.allclose(found.sim[order], truth.sim[reference], atol=1e-5)


def test_a_dense_cluster_over_the_batch_limit_is_searched_alone_with_the_same_pairs():
    """A cluster whose own product is over the CPU batch limit (a group of near copies, as LAION's placeholders)
    goes through the tiled search with its quota instead of one padded product that held every candidate pair
    before the quota: the pairs are those of the padded product, first 33 earlier rows per row."""
    from curate.dedup.cluster import normalize
    from curate.dedup.products import BATCH_SIMS, Vectors, _batched_pairs, pairs_in_clusters

    rng = np.random.default_rng(9)
    dense = normalize(rng.standard_normal(512) + 0.05 * rng.standard_normal((1600, 512)))  # every pair ~0.99
    spread = normalize(rng.standard_normal((300, 512)))
    spread[150:160] = normalize(spread[:10] + 0.01 * rng.standard_normal((10, 512)))
    x = Vectors.for_precision(np.concatenate([dense, spread]).astype(np.float32), "auto")
    clusters = [np.arange(1600), np.arange(1600, 1900)]
    assert 1600**2 > BATCH_SIMS >= 300**2
    found = pairs_in_clusters(x, clusters, 0.75, threads=1, quota=33)
    for members, (a, b, sim) in zip(clusters, found, strict=True):
        ra, rb, rsim = _batched_pairs(x, [members], 0.75, 33)
        assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == sorted(zip(ra.tolist(), rb.tolist(), strict=True))
        assert np.allclose(np.sort(sim), np.sort(rsim), atol=1e-6)
    assert len(found[0][0]) == 33 * (1600 - 33) + 33 * 32 // 2  # each row's first 33 earlier rows
    assert len(found[1][0]) == 10


def test_rounds_unite_independent_clusterings():
    x, _ = planted_vectors(8000, seed=4)
    truth = brute_force_pairs(x, 0.75)
    plain = DedupParams(clusters=200, assign_top=1, refine_iters=0)  # SD3's plain recipe: recall well below 1
    one, two = dedup(x, params=plain), dedup(x, params=DedupParams(**{**vars(plain), "rounds": 2}))
    assert set(one.pairs.keys(len(x)).tolist()) < set(two.pairs.keys(len(x)).tolist())  # round 1 is the same
    assert pair_recall(one.pairs, truth, len(x)) + 0.03 < pair_recall(two.pairs, truth, len(x))  # 0.946 -> 0.996


def test_default_clusters_grow_with_data():
    assert default_clusters(1) == 1
    assert default_clusters(40) == 10
    assert default_clusters(100_000) == 949
    assert default_clusters(1_000_000) == 3000
    assert default_clusters(10**10) == 16_000


def test_greedy_keeps_first_unmarked_and_marked_items_mark_nobody():
    # chain 0-1-2: 0 is kept and marks 1; 1 is marked so it does not mark 2, which is kept (SD3's loop)
    pairs = Pairs(np.array([0, 1]), np.array([1, 2]), np.array([0.9, 0.8], np.float32))
    keep, dup_of, sim = greedy(3, pairs, np.arange(3))
    assert keep.tolist() == [True, False, True]
    assert dup_of.tolist() == [-1, 0, -1]
    assert sim[1] == pytest.approx(0.9)
    # reversed order: 2 first marks 1; 0 is not a neighbour of 2 and stays
    keep, dup_of, _ = greedy(3, pairs, np.array([2, 1, 0]))
    assert keep.tolist() == [True, False, True]
    assert dup_of.tolist() == [-1, 2, -1]


def test_keep_order_and_exact_groups():
    keys = ["b", "a", "c", "d"]
    width = np.array([100, 100, 300, 50])
    height = np.array([100, 100, 300, 50])
    rank = keep_rank("largest_first", keys, width, height)
    assert np.argsort(rank).tolist() == [2, 1, 0, 3]  # largest, then ties by key
    assert keep_rank("input_order", keys, width, height).tolist() == [0, 1, 2, 3]
    dup_of = exact_groups(["h1", "h2", "h1", None], rank)
    assert dup_of.tolist() == [2, -1, -1, -1]  # row 2 is larger, so it is the first copy in keep order


def test_small_and_empty_inputs():
    assert len(dedup(np.zeros((0, 8), np.float32)).keep) == 0
    one = dedup(np.ones((1, 8), np.float32))
    assert one.keep.tolist() == [True]
    x = np.eye(8, dtype=np.float32)[[0, 0, 1]]
    result = dedup(x)
    assert result.keep.tolist() == [True, False, True]
    assert result.dup_of.tolist() == [-1, 0, -1]


def _read_stage(run: Path, stage: str) -> pa.Table:
    files = sorted((run / stage).glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_cluster) -> Path:
    from curate.samples import write_samples

    root = tmp_path_factory.mktemp("dedup-demo")
    write_samples(root / "images")
    run = root / "run"
    run_dedup_pipeline(root / "images", run, ONNX_SSCD)
    return run


def test_dedup_stage_on_sample_images(demo_run: Path):
    ingest = _read_stage(demo_run, "ingest")
    sscd = _read_stage(demo_run, "sscd")
    table = _read_stage(demo_run, "dedup")
    assert table.num_rows == sscd.num_rows == ingest.num_rows == 31  # nothing lost
    assert table["key"].to_pylist() == ingest["key"].to_pylist()
    names = {k: Path(u).name for k, u in zip(ingest["key"].to_pylist(), ingest["url"].to_pylist(), strict=True)}
    rows = {names[r["key"]]: r for r in table.to_pylist()}
    # broken files are counted with their reason, never kept, never crash
    for name, status in [
        ("empty.jpg", "empty_file"),
        ("truncated.jpg", "truncated"),
        ("not-an-image.jpg", "decode_error"),
    ]:
        assert rows[name]["status"] == status and rows[name]["reason"] == "not_ok" and not rows[name]["keep"]
    # the planted copies are found: a crop and a smaller, heavily re-compressed copy
    dropped = {name for name, r in rows.items() if r["reason"] in ("near_duplicate", "exact_duplicate")}
    assert {"astronaut-crop.jpg", "coffee-small.jpg"} <= dropped
    from curate.stages.dedup import kept_keys

    kept = set().union(*(kept_keys(str(demo_run / "dedup"), i) for i in range(4)))
    assert kept == {r["key"] for r in table.to_pylist() if r["keep"]}
    assert rows["astronaut-crop.jpg"]["dup_of"] == next(k for k, n in names.items() if n == "astronaut.jpg")
    distinct = ["brick.png", "grass.png", "gravel.png", "moon.png", "page.png", "text.png", "china.jpg", "flower.jpg"]
    assert all(rows[n]["keep"] for n in distinct)
    record = json.loads((demo_run / "dedup" / "_SUCCESS.json").read_text())
    assert record["status"]["empty_file"] == 1 and record["status"]["ok"] == 28
    report = json.loads((demo_run / "dedup" / "_report" / "dedup_report.json").read_text())
    assert report["removed"] == len(dropped)
    assert report["fraction_removed"] == pytest.approx(len(dropped) / 28)
    assert report["threshold_analysis"][0]["threshold"] == 0.5
    fractions = [r["fraction_removed"] for r in report["threshold_analysis"]]
    assert fractions == sorted(fractions, reverse=True)  # a lower threshold never removes less
    assert (demo_run / "dedup" / "_report" / "dedup_report.png").stat().st_size > 1000
    assert "| 0.75 |" in (demo_run / "dedup" / "_report" / "dedup_report.md").read_text()


def test_sscd_column_reads_in_pyarrow_ray_and_numpy(demo_run: Path):
    import ray

    shard = demo_run / "sscd" / "shard-00000.parquet"
    table = pq.read_table(shard)
    assert table.schema.field("sscd").type == pa.fixed_shape_tensor(pa.float16(), [512])
    matrix = table["sscd"].combine_chunks().to_numpy_ndarray()
    assert matrix.shape == (table.num_rows, 512) and matrix.dtype == np.float16
    ok = np.array(table["status"].to_pylist()) == "ok"
    assert np.allclose(np.linalg.norm(matrix[ok].astype(np.float32), axis=1), 1.0, atol=2e-3)
    batch = ray.data.read_parquet(str(shard)).take_batch(100)
    assert batch["sscd"].shape == (table.num_rows, 512)
    assert np.array_equal(batch["sscd"], matrix)


def test_dedup_resume_redoes_only_missing_shards(demo_run: Path, ray_cluster):
    stage = demo_run / "dedup"
    global_marker = stage / "_global" / "_DONE.json"
    before = global_marker.read_text()
    expected = pq.read_table(stage / "shard-00001.parquet")
    (stage / "_shards" / "shard-00001.json").unlink()
    (stage / "_SUCCESS.json").unlink()
    (stage / "shard-00001.parquet").unlink()
    images = Path(json.loads((demo_run / "ingest" / "_stage.json").read_text())["config"]["path"])
    records = run_dedup_pipeline(images, demo_run, ONNX_SSCD)
    assert records["dedup"]["rows"] == 31
    assert global_marker.read_text() == before  # the global step was not redone
    assert pq.read_table(stage / "shard-00001.parquet").equals(expected)


def test_notebook_shows_duplicate_groups(demo_run: Path):
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).parent.parent / "notebooks" / "dedup_clusters.ipynb"
    notebook = nbformat.read(path, as_version=4)
    os.environ["CURATE_RUN"] = str(demo_run)
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    finally:
        os.environ.pop("CURATE_RUN", None)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "duplicate groups" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_decide_with_no_embeddings_and_with_exact_copies():
    from curate.stages.dedup import DedupConfig, decide

    def table(status, sha, width):
        n = len(status)
        return pa.table(
            {
                "key": [f"k{i}" for i in range(n)],
                "status": status,
                "width": pa.array(width, pa.int32()),
                "height": pa.array(width, pa.int32()),
                "sha256": sha,
            }
        )

    config = DedupConfig(kind="dedup")
    columns, report = decide(
        config, table(["decode_error", "empty_file"], [None, None], [None, None]), np.zeros((2, 512))
    )
    assert columns["keep"].tolist() == [False, False] and columns["reason"] == ["not_ok", "not_ok"]
    assert report["removed"] == 0 and report["ok"] == 0
    # three identical files and one other: the largest identical file is kept, the others point at it
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4, 512)).astype(np.float16)
    vectors[1] = vectors[2] = vectors[0]
    columns, report = decide(config, table(["ok"] * 4, ["a", "a", "a", "b"], [10, 30, 20, 5]), vectors)
    assert columns["keep"].tolist() == [False, True, False, True]
    assert columns["dup_of"] == ["k1", None, "k1", None]
    assert columns["reason"] == ["exact_duplicate", "kept", "exact_duplicate", "kept"]
    assert report["exact_duplicates"] == 2 and report["near_duplicates"] == 0
