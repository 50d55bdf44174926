"""Incremental dedup: a new batch B against an earlier run A's dedup index, against a full dedup of A + B in the same
run (bench/dedup.py calls this with --increment A_ROWS B_ROWS).

Data (curate.dedup.synthetic, shaped like real embeddings rather than uniform noise): topics of very uneven sizes
(Zipf), 10% near copies inside each run (half of them of a row in another shard), a placeholder group (1% of the
rows near one image), and in B near copies of A's rows (``--run-copies``, from A shards other than the B shard's).
A, B and A + B are `sscd` stages written shard by shard (A + B links A's and B's files).

Runs, each through `curate run` with an embedded Ray of the machine's CPUs and 4 GiB per task:
1. A's dedup (its index is what B is searched against);
2. B against A with the defaults (the distributed path: A's index is larger than one task should read), and with
   the single-process path forced (one task) - the same decisions;
3. a full dedup of A + B (distributed, 2.1M rows): the reference time. Target: incremental <= 0.15x full.
Checks (exact, float32): every `seen_before` row's `dup_of` is a row of A's index and its similarity equals the
true one; sampled pair recall against exact neighbours of B's rows among A's indexed rows; A's files unchanged;
B's own decisions equal a standalone run of B with its `seen_before` rows taken out first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GiB = 2**30


def write_stage(run: Path, batch, prefix: str, first_shard: int = 0) -> int:
    """``batch`` as the `sscd` stage of ``run`` (shards ``first_shard``...), one shard in memory at a time."""
    from curate import storage
    from curate.runfolder import RunDir, ShardStats
    from curate.schema import SSCD_SCHEMA, make_key

    stage = RunDir(str(run)).stage("sscd")
    for s in range(batch.shards):
        x = batch.vectors(s)
        rows = len(x)
        side = np.random.default_rng([batch.seed, s, 9]).integers(200, 1200, rows).astype(np.int32)
        keys = [make_key(f"{prefix}-{s}-{r}") for r in range(rows)]
        table = pa.table(
            {
                "key": keys,
                "sscd": pa.FixedShapeTensorArray.from_numpy_ndarray(x.astype(np.float16)),
                "status": pa.array(["ok"] * rows),
                "error": pa.nulls(rows, pa.string()),
                "width": pa.array(side),
                "height": pa.array(side),
                "sha256": [hashlib.sha256(k.encode()).hexdigest() for k in keys],
            },
            schema=SSCD_SCHEMA,
        )
        storage.write_parquet_atomic(stage.shard(first_shard + s), table, compression="none")
        stage.write_marker(ShardStats(first_shard + s, rows, {"ok": rows}, 0.0, 0))
    storage.write_json(stage.success_uri, {"stage": "sscd", "shards": batch.shards})
    return batch.shards


def link_stage(target: Path, sources: list[Path]) -> None:
    """An `sscd` stage made of other runs' shards, renumbered in order (hard links: no copy)."""
    from curate import storage
    from curate.runfolder import RunDir, ShardStats

    stage = RunDir(str(target)).stage("sscd")
    (target / "sscd" / "_shards").mkdir(parents=True, exist_ok=True)
    index = 0
    for source in sources:
        for file in sorted((source / "sscd").glob("shard-*.parquet")):
            os.link(file, stage.shard(index))
            rows = pq.ParquetFile(file).metadata.num_rows
            stage.write_marker(ShardStats(index, rows, {"ok": rows}, 0.0, 0))
            index += 1
    storage.write_json(stage.success_uri, {"stage": "sscd", "shards": index})


def stage_without(source: Path, target: Path, drop: set[str]) -> None:
    """``source``'s `sscd` stage without the rows whose key is in ``drop`` (same shards, fewer rows)."""
    from curate import storage
    from curate.runfolder import RunDir, ShardStats

    stage = RunDir(str(target)).stage("sscd")
    for index, file in enumerate(sorted((source / "sscd").glob("shard-*.parquet"))):
        table = pq.read_table(file)
        table = table.filter(pa.array([k not in drop for k in table["key"].to_pylist()]))
        storage.write_parquet_atomic(stage.shard(index), table, compression="none")
        stage.write_marker(ShardStats(index, table.num_rows, {"ok": table.num_rows}, 0.0, 0))
    storage.write_json(stage.success_uri, {"stage": "sscd", "shards": index + 1})


def decisions(run: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((run / "dedup").glob("shard-*.parquet"))])


def index_files(stage: Path) -> list[Path]:
    return sorted((stage / "_index" / "r0").glob("b*/run-*.parquet"))


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def check_matches(run_b: Path, index_stage: Path, threshold: float, queries: int, seed: int) -> dict:
    """Every seen_before row's dup_of is an indexed row of A with its true similarity; sampled pair recall against
    exact float32 neighbours of B's rows among A's indexed rows (pairs whose B row was not removed as seen_before
    are misses), streamed over A's index files."""
    from curate.dedup.cluster import normalize
    from curate.dedup.layout import vectors_of
    from curate.schema import embedding_matrix

    started = time.perf_counter()
    rows = decisions(run_b)
    sscd = [pq.read_table(f, columns=["key", "sscd"]) for f in sorted((run_b / "sscd").glob("shard-*.parquet"))]
    keys = [k for t in sscd for k in t["key"].to_pylist()]
    x = normalize(np.concatenate([embedding_matrix(t["sscd"]) for t in sscd]))
    reason = np.array(rows["reason"].to_pylist(), object)
    seen = np.flatnonzero(reason == "seen_before")
    wanted = {}
    for i in seen.tolist():
        wanted.setdefault(rows["dup_of"][i].as_py(), []).append(i)
    sample = np.sort(np.random.default_rng(seed).choice(len(keys), min(queries, len(keys)), replace=False))
    xq = x[sample]
    checked, worst, true_pairs, found_pairs = 0, 0.0, 0, 0
    removed = reason[sample] == "seen_before"
    for file in index_files(index_stage):
        table = pq.read_table(file, columns=["key", "vector"])
        ref = normalize(vectors_of(table["vector"], x.shape[1]))
        for j, key in enumerate(table["key"].to_pylist()):
            for i in wanted.pop(key, []):
                true = float(np.einsum("i,i->", x[i], ref[j]))
                worst = max(worst, abs(true - float(rows["similarity"][i].as_py())))
                checked += 1
        qi, _ = np.nonzero(xq @ ref.T > threshold)
        true_pairs += len(qi)
        found_pairs += int(removed[qi].sum())
    return {
        "seen_before": len(seen),
        "dup_of_not_in_index": sum(len(v) for v in wanted.values()),
        "checked": checked,
        "max_similarity_error": worst,
        "sampled_rows": len(sample),
        "true_pairs": true_pairs,
        "recall": found_pairs / max(1, true_pairs),
        "seconds": time.perf_counter() - started,
    }


def same_within_run(run_b: Path, run_alone: Path) -> dict:
    """B's rows that no reference removed: their decisions equal those of the standalone run of B without them."""
    mine = {r["key"]: r for r in decisions(run_b).to_pylist() if r["reason"] != "seen_before"}
    alone = {r["key"]: r for r in decisions(run_alone).to_pylist()}
    columns = ("keep", "dup_of", "similarity", "reason", "cluster")
    differ = [k for k, r in mine.items() if k not in alone or any(r[c] != alone[k][c] for c in columns)]
    return {"rows": len(mine), "standalone_rows": len(alone), "differ": len(differ)}


def largest(result: dict) -> tuple[float, str]:
    phase, row = max(result["phases"].items(), key=lambda kv: kv[1]["peak_rss"])
    return row["peak_rss"] / GiB, f"{phase} {row['peak_task']}"


def bench_increment(a_rows: int, b_rows: int, folder: Path, cpus: int, queries: int, threshold: float, seed: int,
                    run_copies: float, keep_data: bool) -> dict:  # fmt: skip
    from dedup_global import print_phases, run_dedup

    from curate.dedup.synthetic import Batch, World

    world = World(seed=seed, topics=max(100, a_rows // 400))
    a = Batch(world, 1, max(1, a_rows // 100_000), min(a_rows, 100_000))
    b = Batch(world, 2, max(1, b_rows // 10_000), min(b_rows, 10_000), copies_of=a, run_copy_fraction=run_copies)
    runs = {name: folder / name for name in ("A", "B", "B-single", "AB", "B-alone")}
    started = time.perf_counter()
    if not (runs["A"] / "sscd" / "_SUCCESS.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_stage(runs["A"], a, "a")
        print(f"# wrote A: {a.rows:,} rows in {a.shards} shards ({time.perf_counter() - started:.0f} s)", flush=True)
    for name in ("B", "B-single"):
        shutil.rmtree(runs[name], ignore_errors=True)
        write_stage(runs[name], b, "b")
    shutil.rmtree(runs["AB"], ignore_errors=True)
    link_stage(runs["AB"], [runs["A"], runs["B"]])
    print(f"# B: {b.rows:,} rows in {b.shards} shards, {run_copies:.0%} of them near copies of A's rows; A + B linked "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    common = {"threshold": threshold, "central_cpus": cpus, "resources": {"num_cpus": 1, "memory": 4 * GiB}}
    out: dict = {}

    def run(label: str, folder_: Path, settings: dict) -> dict:
        load = os.getloadavg()[0]
        result = run_dedup(folder_, {**common, **settings}, cpus)
        rss, task = largest(result)
        print(f"\n## {label}: global step {result['global_seconds']:.1f} s (load average {load:.1f}-"
              f"{os.getloadavg()[0]:.1f}); largest task {rss:.2f} GiB ({task}); driver "
              f"{result['driver_rss'] / GiB:.2f} GiB", flush=True)  # fmt: skip
        print_phases(result)
        out[label] = result
        return result

    if not (runs["A"] / "dedup" / "_SUCCESS.json").exists():
        run("A: full dedup (its index)", runs["A"], {})
    before = folder_digest(runs["A"])
    against = [{"name": "A", "path": str(runs["A"] / "dedup")}]
    incremental = run("B against A (defaults)", runs["B"], {"against": against})
    one_task = run("B against A (single-process path)", runs["B-single"],
                   {"against": against, "single_process_rows": 10**9})  # fmt: skip
    full = run("A + B: full dedup", runs["AB"], {})
    unchanged = folder_digest(runs["A"]) == before
    b_rows_ = decisions(runs["B"])
    same_paths = all(b_rows_[c].equals(decisions(runs["B-single"])[c]) for c in b_rows_.column_names)
    checks = check_matches(runs["B"], runs["A"] / "dedup", threshold, queries, seed)
    taken = {r["key"] for r in b_rows_.to_pylist() if r["reason"] == "seen_before"}
    shutil.rmtree(runs["B-alone"], ignore_errors=True)
    stage_without(runs["B"], runs["B-alone"], taken)
    run("B without its seen_before rows, alone", runs["B-alone"], {})
    within = same_within_run(runs["B"], runs["B-alone"])
    t_full = full["global_seconds"]
    print("\n## result")
    for label, result in (("defaults", incremental), ("single-process", one_task)):
        rss, task = largest(result)
        print(f"incremental ({label}) / full global step: {result['global_seconds']:.1f} / {t_full:.1f} s = "
              f"{result['global_seconds'] / t_full:.3f} (target <= 0.15); largest task {rss:.2f} GiB ({task}), "
              f"budget 4.00 GiB")  # fmt: skip
    rss, task = largest(full)
    print(f"full dedup of A + B: largest task {rss:.2f} GiB ({task})")
    c = checks
    print(f"seen_before rows {c['seen_before']:,}: dup_of not an indexed row of A: {c['dup_of_not_in_index']}; "
          f"largest |recorded - true similarity| {c['max_similarity_error']:.2e} over {c['checked']:,}")  # fmt: skip
    print(f"sampled pair recall: {c['true_pairs']:,} exact float32 pairs (> {threshold}) of {c['sampled_rows']:,} "
          f"random B rows with A's indexed rows, recall {c['recall']:.4f} (target >= 0.99)")  # fmt: skip
    print(f"A unchanged (every file's bytes): {unchanged}; distributed and single-process paths decide alike: "
          f"{same_paths}")  # fmt: skip
    print(f"B's own decisions vs a standalone run of B without its {len(taken):,} seen_before rows: "
          f"{within['differ']} of {within['rows']:,} rows differ")  # fmt: skip
    out.update({"checks": checks, "unchanged": unchanged, "same_paths": same_paths, "within": within})
    if not keep_data:
        shutil.rmtree(folder, ignore_errors=True)
    return {k: v for k, v in out.items() if k in ("checks", "unchanged", "same_paths", "within")} | {
        "seconds": {k: v["global_seconds"] for k, v in out.items() if isinstance(v, dict) and "global_seconds" in v}
    }


def write_json(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def probe_sweep(n: int, seed: int, pairs: int = 20_000) -> list[dict]:
    """How many probes a new row needs: clusterings of N reference rows (the defaults' K, refine passes, two
    rounds), new rows at cosine 0.75-0.99 to a random reference row (the hard end of copies included), and for
    each probe count the share of those pairs where the reference row's nearest cluster is among the new row's
    probes, in one round and in either of two. On structured embeddings (curate.dedup.synthetic) and on uniform
    random vectors (the worst case). How `against`'s default probes were chosen."""
    from dataclasses import replace

    from curate.dedup.cluster import DedupParams, cluster, nearest_centroids, normalize, planted_vectors
    from curate.dedup.products import Vectors
    from curate.dedup.synthetic import Batch, World

    rows = []
    for label in ("structured", "uniform"):
        if label == "structured":
            x = Batch(World(seed=seed, topics=max(50, n // 250)), 1, max(1, n // 50_000), min(n, 50_000)).all_vectors()
        else:
            x, _ = planted_vectors(n, seed=seed)
        params = replace(DedupParams().resolved(len(x)), assign_top=1)
        vectors = Vectors.for_precision(x, "auto")
        rng = np.random.default_rng(seed + 5)
        a = rng.choice(len(x), pairs, replace=False)
        target = rng.uniform(0.75, 0.99, pairs).astype(np.float32)[:, None]
        noise = rng.standard_normal((pairs, x.shape[1])).astype(np.float32)
        noise -= (noise * x[a]).sum(1, keepdims=True) * x[a]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        new = Vectors.for_precision(normalize(target * x[a] + np.sqrt(1 - target**2) * noise), "auto")
        hits = []
        for r in range(2):
            c = cluster(vectors, replace(params, seed=params.seed + r))
            top = nearest_centroids(new, c.centroids, 32, params, False)
            hits.append(top == c.assignment[a, 0][:, None])
        for p in (1, 2, 4, 8, 12, 16, 24, 32):
            one, two = hits[0][:, :p].any(1), hits[1][:, :p].any(1)
            row = {"data": label, "n": len(x), "k": len(c.centroids), "probes": p,
                   "one_round": float(one.mean()), "two_rounds": float((one | two).mean())}  # fmt: skip
            print(f"{label:>10} N={len(x):,} K={row['k']:,} probes {p:>2}: pairs found, 1 round {row['one_round']:.4f},"
                  f" 2 rounds {row['two_rounds']:.4f}", flush=True)  # fmt: skip
            rows.append(row)
    return rows
