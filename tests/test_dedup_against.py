"""Incremental dedup (`against:`): a new batch against an earlier run's dedup index and against reference sets.

Embeddings are synthetic and shaped like real ones (curate.dedup.synthetic: topics of uneven sizes, copies across
shards and across runs, a placeholder group): the search, the rules and the index are under test here; the real
SSCD model is in `test_real_sscd_decontamination`. Most runs are decided in this process
(`_dedup_support.dedup_in_process`: the stage's global step task by task, as the runner does it, without Ray);
the runner, Ray and a multi-node cluster are in the tests marked slow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _dedup_support import (
    ONNX_SSCD,
    dedup_in_process,
    earlier_run,
    index_rows,
    new_batch,
    read_decisions,
    stage_rows,
    write_embedding_stage,
)

from curate.config import ConfigError
from curate.dedup.cluster import normalize
from curate.dedup.synthetic import Batch, World
from curate.schema import embedding_matrix

THRESHOLD = 0.75


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _vectors(run: Path) -> tuple[list[str], np.ndarray]:
    tables = [pq.read_table(f, columns=["key", "sscd"]) for f in sorted((run / "sscd").glob("shard-*.parquet"))]
    keys = [k for t in tables for k in t["key"].to_pylist()]
    return keys, normalize(np.concatenate([embedding_matrix(t["sscd"]) for t in tables]))


@pytest.fixture(scope="module")
def world() -> World:
    return World(topics=40)


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, world):
    """Run A (6,000 rows in 4 shards) deduplicated, its index left behind."""
    return earlier_run(tmp_path_factory.mktemp("A") / "run", world)


@pytest.mark.parametrize("search", ["clusters", "exact"])
def test_against_an_earlier_run_matches_brute_force(tmp_path, world, earlier, search):
    run_a, batch_a = earlier
    before = _digest(run_a)
    run = tmp_path / "B"
    shards = stage_rows([new_batch(world, batch_a).vectors(s) for s in range(3)], "b", seed=1)
    write_embedding_stage(run, shards)
    dedup_in_process(run, against=[{"name": "laion", "path": str(run_a / "dedup"), "search": search}])
    assert _digest(run_a) == before  # no row (or file) of the reference changes

    decisions = read_decisions(run).to_pylist()
    index = index_rows(run_a / "dedup")
    ref_keys = index["key"].to_pylist()
    ref_x = normalize(np.frombuffer(index["vector"].combine_chunks().buffers()[1], np.float16).reshape(-1, 512))
    _, x = _vectors(run)
    seen = [i for i, r in enumerate(decisions) if r["reason"] == "seen_before"]
    assert len(seen) > 250  # ~300 planted copies of A's rows, most of them of rows A kept
    at = {k: i for i, k in enumerate(ref_keys)}
    for i in seen:  # every dup_of is a real reference row, with the true float32 similarity
        row = decisions[i]
        assert row["dup_reference"] == "laion" and not row["keep"]
        true = float(np.dot(x[i], ref_x[at[row["dup_of"]]]))
        assert abs(row["similarity"] - true) < 1e-6 and row["similarity"] > THRESHOLD
    assert all(r["dup_reference"] is None for r in decisions if r["reason"] != "seen_before")

    # exact float32 neighbours of every B row among A's indexed (kept) rows
    truth_b, _ = np.nonzero(x @ ref_x.T > THRESHOLD)
    removed = np.array([r["reason"] == "seen_before" for r in decisions])
    recall = removed[truth_b].mean()
    print(f"{search}: {len(truth_b)} true pairs, pair recall {recall:.4f}")
    assert recall >= (1.0 if search == "exact" else 0.99)
    assert set(seen) == set(truth_b.tolist()) or search == "clusters"

    if search == "exact":
        return  # the rest (B's own decisions) does not depend on how the reference was searched
    # B's own decisions equal a standalone run of B with the seen_before rows taken out first
    alone = tmp_path / "B-alone"
    taken = {decisions[i]["key"] for i in seen}
    write_embedding_stage(alone, [
        {"key": [k for k in s["key"] if k not in taken],
         "side": s["side"][[k not in taken for k in s["key"]]],
         "x": s["x"][[k not in taken for k in s["key"]]]}
        for s in shards
    ])  # fmt: skip
    dedup_in_process(alone)
    standalone = {r["key"]: r for r in read_decisions(alone).to_pylist()}
    mine = [r for r in decisions if r["key"] not in taken]
    assert len(mine) == len(standalone)
    for row in mine:
        other = standalone[row["key"]]
        for column in ("keep", "dup_of", "reason", "cluster"):
            assert row[column] == other[column], (column, row, other)
        assert row["similarity"] == other["similarity"] or (row["similarity"] is None and other["similarity"] is None)


def test_a_small_batch_against_a_large_reference_searches_it_in_tasks(tmp_path, world, earlier):
    """A batch one task can hold against an index larger than one task should read: the reference search runs as
    phases of tasks, the batch's own dedup in one task; the same decisions as all in one task."""
    run_a, batch_a = earlier
    shards = stage_rows([new_batch(world, batch_a, shards=1, shard_rows=400).vectors(0)], "b", seed=3)
    against = [{"name": "a", "path": str(run_a / "dedup"), "search": "clusters"}]
    runs = {label: tmp_path / label for label in ("one-task", "tasks-then-one")}
    for run in runs.values():
        write_embedding_stage(run, shards)
    dedup_in_process(runs["one-task"], against=against)
    summary = dedup_in_process(runs["tasks-then-one"], against=against, single_process_rows=400)  # 10 x 400 < A
    assert summary["path"] == "references distributed, then single-process"
    phases = {p.name for p in (runs["tasks-then-one"] / "dedup" / "_global" / "_tasks").iterdir()}
    assert {"x0-probe", "x0-search", "x-resolve", "single"} <= phases
    one, two = read_decisions(runs["one-task"]), read_decisions(runs["tasks-then-one"])
    assert int((np.array(one["reason"].to_pylist()) == "seen_before").sum()) > 20
    for column in one.column_names:
        assert one[column].equals(two[column]), column


def test_the_index_holds_each_kept_row_once_per_round(earlier):
    run_a, _ = earlier
    stage = run_a / "dedup"
    manifest = json.loads((stage / "_index" / "manifest.json").read_text())
    kept = sorted(r["key"] for r in read_decisions(run_a).to_pylist() if r["keep"])
    assert manifest["format"] == "curate-dedup-index" and manifest["version"] == 1
    assert manifest["model"]["path"] == ONNX_SSCD and len(manifest["model"]["sha256"]) == 64
    assert manifest["rows"] == {"upstream": 6000, "embedded": 6000, "kept": len(kept), "indexed": len(kept)}
    assert manifest["threshold"] == THRESHOLD and manifest["k"] > 1 and manifest["rounds"] >= 1
    assert manifest["source"]["run"] == str(run_a)
    for r in range(manifest["rounds"]):
        files = sorted((stage / "_index" / f"r{r}").glob("b*/run-*.parquet"))
        table = pa.concat_tables([pq.read_table(f) for f in files])
        assert sorted(table["key"].to_pylist()) == kept
        centroids = np.load(stage / "_index" / f"centroids-r{r}.npy")
        sizes = np.load(stage / "_index" / f"sizes-r{r}.npy")
        assert centroids.shape == (manifest["k"], 512) and sizes.sum() == len(kept)
        for f in files:  # sorted by cluster, in row groups a reader of a few clusters can pick
            cluster = pq.read_table(f, columns=["cluster"])["cluster"].to_numpy()
            assert (np.diff(cluster) >= 0).all()
    assert not (stage / "_index" / "parts").exists()


def test_chain_each_index_holds_only_its_own_kept_rows(tmp_path, world, earlier):
    """C against A and B, where B was itself against A: B's index holds B's kept rows only (not the rows A
    already had), C's removals name the reference whose row they copy, the first listed when both match."""
    run_a, batch_a = earlier
    batch_b = new_batch(world, batch_a)
    run_b, run_c = tmp_path / "B", tmp_path / "C"
    write_embedding_stage(run_b, stage_rows([batch_b.vectors(s) for s in range(3)], "b", seed=1))
    dedup_in_process(run_b, against=[{"name": "a", "path": str(run_a / "dedup")}])
    b_rows = read_decisions(run_b).to_pylist()
    b_index = set(index_rows(run_b / "dedup")["key"].to_pylist())
    assert b_index == {r["key"] for r in b_rows if r["keep"]}
    assert not b_index & {r["key"] for r in b_rows if r["reason"] == "seen_before"}
    manifest = json.loads((run_b / "dedup" / "_index" / "manifest.json").read_text())
    assert [r["name"] for r in manifest["references"]] == ["a"]

    batch_c = Batch(world, 3, 2, 1000, copies_of=batch_b, run_copy_fraction=0.15)
    write_embedding_stage(run_c, stage_rows([batch_c.vectors(s) for s in range(2)], "c", seed=2))
    dedup_in_process(run_c, against=[{"name": "a", "path": str(run_a / "dedup")},
                                     {"name": "b", "path": str(run_b / "dedup")}])  # fmt: skip
    c_rows = read_decisions(run_c).to_pylist()
    index = {"a": set(index_rows(run_a / "dedup")["key"].to_pylist()), "b": b_index}
    named = {"a": 0, "b": 0}
    for row in c_rows:
        if row["reason"] == "seen_before":
            assert row["dup_of"] in index[row["dup_reference"]]
            named[row["dup_reference"]] += 1
    assert named["a"] >= 10 and named["b"] > 100  # copies of rows B had removed as seen in A, and of its own rows
    report = json.loads((run_c / "dedup" / "_report" / "dedup_report.json").read_text())
    by_name = {r["name"]: r for r in report["references"]}
    assert by_name["a"]["removed"] == named["a"] and by_name["b"]["removed"] == named["b"]
    assert by_name["b"]["matched"] >= by_name["b"]["removed"]  # rows matched by both are named after a
    assert by_name["b"]["its_references"] == ["a"]


def test_drift_is_reported_when_the_new_rows_do_not_fit_the_old_clustering(tmp_path, world, earlier):
    run_a, batch_a = earlier
    reports = {}
    for label, new_topics in (("same", 0.0), ("drifted", 0.9)):
        batch = Batch(world, 5, 2, 1000, new_topics=new_topics, copies_of=batch_a, run_copy_fraction=0.05)
        run = tmp_path / label
        write_embedding_stage(run, stage_rows([batch.vectors(s) for s in range(2)], label))
        dedup_in_process(run, against=[{"name": "a", "path": str(run_a / "dedup"), "search": "clusters"}])
        reports[label] = json.loads((run / "dedup" / "_report" / "dedup_report.json").read_text())["references"][0]
    same, drifted = reports["same"]["drift"], reports["drifted"]["drift"]
    print(json.dumps({"same": same["new_below_reference_p5"], "drifted": drifted["new_below_reference_p5"]}))
    assert same["new_below_reference_p5"] < 0.15 and not same["drift"]
    assert drifted["new_below_reference_p5"] > 0.5 and drifted["drift"] and "drift" in drifted["advice"]
    assert sum(reports["same"]["clusters_touched"]) <= reports["same"]["clusters"] * reports["same"]["rounds"]


def test_check_refuses_a_reference_that_is_no_index_or_was_made_with_another_model(tmp_path, earlier):
    from conftest import curate_cli

    run_a, _ = earlier
    other = tmp_path / "other-model" / "dedup"
    other.parent.mkdir()
    import shutil

    shutil.copytree(run_a / "dedup", other)
    manifest = json.loads((other / "_index" / "manifest.json").read_text())
    manifest["model"] = {"path": "/models/sscd_disc_large.torchscript.pt", "sha256": "0" * 64, "bytes": 1}
    (other / "_index" / "manifest.json").write_text(json.dumps(manifest))
    pipeline = tmp_path / "increment.yaml"
    stages = [
        {"kind": "local", "name": "ingest", "path": str(tmp_path), "captions": "none"},
        {"kind": "sscd"},
        {"kind": "dedup", "against": [{"name": "sscd-only", "path": str(run_a / "sscd")},
                                      {"name": "other", "path": str(other)},
                                      {"name": "good", "path": str(run_a / "dedup")}]},
    ]  # fmt: skip
    import yaml

    pipeline.write_text(yaml.safe_dump({"name": "increment", "output": str(tmp_path / "run"),
                                        "models": {"sscd": {"path": ONNX_SSCD}}, "stages": stages}))  # fmt: skip
    result = curate_cli("check", str(pipeline))
    assert result.returncode != 0
    lines = [line.strip() for line in result.stderr.splitlines() + result.stdout.splitlines()]
    first = next(line for line in lines if "against[0].path" in line)
    assert "stages[2].against[0].path" in first and "not a dedup index" in first, first
    second = next(line for line in lines if "against[1].path" in line)
    assert "another SSCD model" in second, second
    assert not any("against[2]" in line for line in lines)

    from curate.pipeline import parse_pipeline

    with pytest.raises(ConfigError) as error:
        parse_pipeline(pipeline.read_text(), "increment.yaml", base_dir=tmp_path)
    assert len(error.value.problems) == 2


# -- through the runner and the real int8 SSCD (the multi-node run against an index: tests/test_dedup_distributed.py) --


def _decontam_bench():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import dedup_decontam

    return dedup_decontam


def test_real_sscd_decontamination(tmp_path, ray_cluster):
    """A small bench/dedup_decontam.py: 3 real reference images, 10 transformed copies of two of them (crop,
    JPEG 30, downscale, grayscale, text overlay) among 4 unrelated images, the real int8 SSCD, at cosine 0.5. The
    reference set is searched exactly, so what is found equals the exact all-pairs ceiling; the report's gallery
    shows each removed copy beside its reference image."""
    from curate.pipeline import load_pipeline
    from curate.runner import run_pipeline

    bench = _decontam_bench()
    truth = bench.write_sets(tmp_path, ["astronaut", "coffee", "camera"], ["astronaut", "camera"],
                             ["brick", "clock", "retina", "text"], transform_unrelated=False)  # fmt: skip
    reference, train = bench.pipelines(tmp_path, [0.5])
    for pipeline in (reference, train):
        run_pipeline(load_pipeline(pipeline), log=lambda line: None)
    (row,) = bench.evaluate(tmp_path, truth, [0.5])
    print(row)
    assert row["copies"] == 10 and row["unrelated"] == 4
    assert row["found"] == row["ceiling_found"] >= 9 and row["right_original"] == row["found"]
    assert row["false"] == row["ceiling_false"] == 0
    report = json.loads((tmp_path / "runs" / "train" / "dedup-050" / "_report" / "dedup_report.json").read_text())
    assert report["eval_overlap"] == row["found"] and report["references"][0]["search"] == "exact"
    pairs = [p for band in report["gallery"][0]["bands"] if band["above_threshold"] for p in band["pairs"]]
    assert pairs and all(p["similarity"] > 0.5 for p in pairs)
    folder = tmp_path / "runs" / "train" / "dedup-050" / "_report"
    assert all((folder / p["new_image"]).is_file() and (folder / p["reference_image"]).is_file() for p in pairs)
