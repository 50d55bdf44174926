"""What shard checksums cost to write, and how fast `curate verify` reads, against references in the same run.

    flock /work/.heavy.lock .venv/bin/python bench/verify.py --gb 10 --folder /work/scratch/verify-bench

Data: a run folder of two stages written as `curate.runner.execute_shard` writes shards
(`storage.write_parquet_atomic` with a CRC32C digest, then the marker):
- `images`: a source shard of `--rows` rows, each a key and 60 kB of incompressible bytes (a JPEG at ~512 px),
  with `curate.schema.parquet_options`;
- `encode`: one shard per `images` shard with the same keys in another order (rows grouped by bucket), in
  `curate.stages.encode`'s schema and write options: SD3 tensors of a 512 px image as fp16 blobs (latent 16x64x64,
  CLIP-L 77x768, OpenCLIP-G 77x1280, pooled 2048, T5 77x4096, and the same four text tensors for the synthetic
  caption: 2.1 MB a row), stored uncompressed, in row groups of about 64 MB.
With 100 rows a shard, an encode shard is 208 MB and its image shard 6 MB: in a real run the encode stage
holds most of the bytes. The stage kinds in the bench's pipeline (`local`, `filter`) only decide the lineage
rules `curate verify` applies (encode is made shard by shard from images, so their keys are compared); the
bytes are random.

Reported:
1. Writing, as A/B pairs in alternating order (ABBA) of one encode shard and one image shard, each written with
   and without a checksum; every write is followed by an `fsync` of its file, so neither side pays for the
   other's writeback. Per pair: the wall time of the write into the page cache (what `execute_shard` waits
   for), the wall time of the write and its `fsync` (the write when the disk is what limits a stage), and the
   process CPU time of the write (all threads). Median and quartiles of the ratios; target: <= 3% wall time.
2. Reading, cold: every shard file dropped from the page cache (`fsync`, then posix_fadvise DONTNEED, per
   file: the machine is shared, so no global `drop_caches`; `fincore` confirms), then `cat` of all shard files
   to /dev/null (the disk's sequential read speed), then, dropped again, `curate.verify.verify_stages` on an
   embedded Ray with 2 CPUs (the CRC of every byte, the footers, the key columns of every encode/images pair,
   the markers). Alternated; target: verify >= 0.8x cat.
3. Reading, warm: both again with every byte in the page cache, when it fits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

MB = 1e6
IMAGE_BYTES = 60_000
ROW_GROUP_BYTES = 64 << 20  # curate.stages.encode's default row_group_bytes
TEXT_SHAPES = {"clip_l": (77, 768), "clip_g": (77, 1280), "pooled": (2048,), "t5": (77, 4096)}
LATENT_SHAPE = (16, 64, 64)


def cpu_header() -> str:
    info = dict(
        line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    )
    flags = set(info.get("Flags", "").split())
    wanted = ["sse4_2", "pclmulqdq", "avx2", "avx512f", "vpclmulqdq"]
    have = " ".join(f for f in wanted if f in flags)
    return f"cpu: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: {have}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def disk_header(folder: Path) -> str:
    source = subprocess.run(["df", "--output=source,fstype,size", str(folder)], capture_output=True, text=True)
    device = source.stdout.split()[3].rsplit("/", 1)[-1]
    queue = Path("/sys/block") / device / "queue"
    tuning = ""
    if queue.exists():
        ahead = (queue / "read_ahead_kb").read_text().strip()
        requests = (queue / "nr_requests").read_text().strip()
        tuning = f", read_ahead_kb {ahead}, nr_requests {requests}"
    return "disk: " + " ".join(source.stdout.split()[3:]) + tuning


# ---------------------------------------------------------------------------------------------------- data


def _blobs(rng: np.random.Generator, rows: int, size: int) -> pa.Array:
    data = rng.bytes(rows * size)
    offsets = np.arange(rows + 1, dtype=np.int32) * size
    return pa.BinaryArray.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def image_table(index: int, rows: int) -> pa.Table:
    rng = np.random.default_rng(index)
    keys = [f"{index:06d}-{i:06d}-{rng.integers(1 << 62):016x}" for i in range(rows)]
    return pa.table(
        {
            "key": keys,
            "image": _blobs(rng, rows, IMAGE_BYTES),
            "status": ["ok"] * rows,
            "width": pa.array([512] * rows, pa.int32()),
            "height": pa.array([512] * rows, pa.int32()),
        }
    )


def encode_table(index: int, keys: pa.Array) -> tuple[pa.Table, dict[str, Any]]:
    """An encode shard of these keys (in another order) and the options curate.stages.encode writes it with."""
    from curate.stages.encode import ENCODE_SCHEMA, TENSOR_COLUMNS

    rows = len(keys)
    rng = np.random.default_rng(1_000_000 + index)
    sizes = {"latent": int(np.prod(LATENT_SHAPE)) * 2} | {n: int(np.prod(s)) * 2 for n, s in TEXT_SHAPES.items()}
    columns: dict[str, Any] = {"key": keys.take(pa.array(rng.permutation(rows)))}
    for field in ENCODE_SCHEMA:
        name = field.name
        if name in ("caption", "caption_synthetic"):
            columns[name] = [f"a photo of a {name} number {i} on a table" for i in range(rows)]
        elif name == "status":
            columns[name] = ["ok"] * rows
        elif name == "bucket":
            columns[name] = ["512x512"] * rows
        elif name in TENSOR_COLUMNS and name.removesuffix("_synthetic") in sizes:
            columns[name] = _blobs(rng, rows, sizes[name.removesuffix("_synthetic")])
        elif field.type == pa.int32():
            columns[name] = pa.array([512] * rows, pa.int32())
        elif name != "key":  # error, latent_std (store_std is off by default)
            columns[name] = pa.nulls(rows, field.type)
    table = pa.Table.from_pydict(columns, schema=ENCODE_SCHEMA)
    per_row = max(1, table.nbytes // max(1, rows))
    step = max(1, ROW_GROUP_BYTES // per_row)
    options = {
        "compression": {n: ("none" if n in TENSOR_COLUMNS else "zstd") for n in table.column_names},
        "use_dictionary": ["key", "status", "error", "bucket"],
        "row_group_sizes": [min(step, rows - s) for s in range(0, rows, step)],
    }
    return table, options


def row_bytes(rows: int) -> int:
    return IMAGE_BYTES + encode_table(0, pa.array([f"{i}" for i in range(rows)]))[0].nbytes // rows


def write_shard(uri: str, table: pa.Table, options: dict[str, Any], checksum: bool = True) -> tuple[int, str]:
    """As curate.runner.execute_shard writes a shard: (size, checksum)."""
    from curate import storage
    from curate.checksums import Digest

    digest = Digest() if checksum else None
    size = storage.write_parquet_atomic(uri, table, digest=digest, **options)
    return size, digest.tagged() if digest else ""


def write_run(folder: Path, gb: float, rows: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The two stages, with their markers and records."""
    from curate import storage
    from curate.runfolder import RunDir, ShardStats, summarize
    from curate.schema import parquet_options

    shards = max(2, round(gb * 1e9 / (rows * row_bytes(rows))))
    run = RunDir(str(folder / "run"))
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    storage.write_atomic(
        run.pipeline_uri,
        (
            f"name: verify-bench\noutput: {run.uri}\nstages:\n"
            f"  - {{kind: local, name: images, path: {folder / 'inputs'}}}\n"
            f"  - {{kind: filter, name: encode, min_side: 1}}\n"
        ).encode(),
    )
    stats: dict[str, list[ShardStats]] = {"images": [], "encode": []}
    started = time.perf_counter()
    for index in range(shards):
        images = image_table(index, rows)
        encode, encode_options = encode_table(index, images["key"].combine_chunks())
        for name, table, options in (("images", images, parquet_options(images)), ("encode", encode, encode_options)):
            stage = run.stage(name)
            size, checksum = write_shard(stage.shard(index), table, options)
            marker = ShardStats(index, table.num_rows, {"ok": table.num_rows}, 0.0, size, {}, checksum)
            stage.write_marker(marker)
            stats[name].append(marker)
        if index % 10 == 9:
            log(f"  written {index + 1}/{shards} shard pairs  [{load()}]")
    for name in ("images", "encode"):
        stage = run.stage(name)
        storage.write_json(stage.record_uri, {"kind": "local" if name == "images" else "filter", "shards": shards})
        storage.write_json(stage.success_uri, {"stage": name, **summarize(stats[name])})
    total = sum(s.bytes for group in stats.values() for s in group)
    return {"shards": shards, "bytes": total, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------- writing


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


HASH_CPU = [0.0]  # CPU seconds spent by curate.checksums.FileFollower threads (counted by _count_hash_cpu)


def _count_hash_cpu() -> None:
    """Count the hashing threads' CPU time (time.thread_time inside the thread): what the checksum costs on a
    machine with no spare core, whatever the load on this one."""
    from curate.checksums import FileFollower

    run = FileFollower._run

    def counted(self: FileFollower) -> None:
        started = time.thread_time()
        try:
            run(self)
        finally:
            HASH_CPU[0] += time.thread_time() - started

    FileFollower._run = counted  # type: ignore[method-assign]


def write_ab(folder: Path, rows: int, pairs: int) -> dict[str, dict[str, list[float]]]:
    """Ratios (with checksum / without - 1) per pair, for an encode and an image shard: wall time into the page
    cache, wall time with fsync, process CPU time; and the hashing thread's CPU time over the plain write's wall
    time."""
    _count_hash_cpu()
    from curate.schema import parquet_options

    folder.mkdir(parents=True, exist_ok=True)
    images = image_table(0, rows)
    encode, encode_options = encode_table(0, images["key"].combine_chunks())
    results: dict[str, dict[str, list[float]]] = {}
    for name, table, options in (("encode", encode, encode_options), ("images", images, parquet_options(images))):
        path = str(folder / f"ab-{name}.parquet")
        ratios: dict[str, list[float]] = {"wall": [], "durable": [], "cpu": [], "plain_s": [], "hash": []}
        for pair in range(pairs):
            seen: dict[bool, tuple[float, float, float]] = {}
            for checksum in (True, False) if pair % 2 else (False, True):
                if os.path.exists(path):
                    os.remove(path)  # fsynced after its write: no writeback of it is left to overlap the next
                cpu, started, hashing = time.process_time(), time.perf_counter(), HASH_CPU[0]
                write_shard(path, table, options, checksum)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                if checksum:
                    ratios["hash"].append(HASH_CPU[0] - hashing)
                _fsync(path)
                seen[checksum] = (wall, time.perf_counter() - started, cpu)
            for i, key in enumerate(("wall", "durable", "cpu")):
                ratios[key].append(seen[True][i] / seen[False][i] - 1)
            ratios["plain_s"].append(seen[False][0])
            ratios["hash"][-1] /= seen[False][0]
        os.remove(path)
        results[name] = ratios
    return results


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{100 * q[1]:+.1f}% (quartiles {100 * q[0]:+.1f}..{100 * q[2]:+.1f}%)"


# ---------------------------------------------------------------------------------------------------- reading


def shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "run").glob("*/shard-*.parquet"))


def drop_cache(files: list[Path]) -> None:
    """Our files only (the machine is shared: no global drop_caches); DONTNEED skips dirty pages, hence fsync."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[Path]) -> float:
    """Of the files' bytes, how much the page cache holds (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, files)],
        capture_output=True,
        text=True,
    ).stdout.split()
    res, size = sum(int(x) for x in out[0::2]), sum(int(x) for x in out[1::2])
    return res / size if size else 0.0


def time_cat(files: list[Path]) -> float:
    started = time.perf_counter()
    for start in range(0, len(files), 200):
        subprocess.run(["cat", *map(str, files[start : start + 200])], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def time_verify(folder: Path) -> float:
    from curate.verify import load_run_pipeline, verify_stages

    run_uri = str(folder / "run")
    pipeline = load_run_pipeline(run_uri)
    started = time.perf_counter()
    checks = verify_stages(pipeline, run_uri, log=lambda line: None)
    seconds = time.perf_counter() - started
    problems = [p.line() for c in checks for p in c.problems or ()]
    assert not problems, f"problems in an undisturbed run: {problems[:5]}"
    return seconds


def _import_verify() -> None:
    """What every worker imports once, whatever the size of the run (pyarrow.dataset brings pandas: ~1 s)."""
    import pyarrow.dataset  # noqa: F401

    import curate.verify  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=10.0, help="size of the run (both stages)")
    parser.add_argument("--rows", type=int, default=100, help="rows per shard")
    parser.add_argument("--pairs", type=int, default=40, help="A/B pairs of shard writes")
    parser.add_argument("--rounds", type=int, default=2, help="cold cat/verify rounds")
    parser.add_argument("--folder", default="/work/scratch/verify-bench")
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    parser.add_argument("--skip-write-ab", action="store_true")
    args = parser.parse_args()
    import crc32c
    import ray

    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    free = shutil.disk_usage(folder).free
    if free < args.gb * 1e9 + 5e9:  # the disk is shared: leave others 5 GB rather than fail them mid-write
        raise SystemExit(f"{free / 1e9:.1f} GB free in {folder}: not enough for a {args.gb:g} GB run and 5 GB spare")
    print(f"bench/verify.py: {args.gb:g} GB run, {args.rows} rows per shard, in {folder}", flush=True)
    print(cpu_header())
    print(disk_header(folder) + f"; crc32c package, hardware CRC instructions: {crc32c.hardware_based}")
    print(f"start: {load()}", flush=True)
    try:
        if not args.skip_write_ab:
            ab = write_ab(folder / "ab", args.rows, args.pairs)
            for name, ratios in ab.items():
                plain = statistics.median(ratios["plain_s"])
                print(
                    f"write A/B, {name} shard, {args.pairs} pairs (plain write {plain:.3f} s median): with vs "
                    f"without checksum: wall {spread(ratios['wall'])}; with fsync {spread(ratios['durable'])}; "
                    f"process CPU {spread(ratios['cpu'])}; CRC thread CPU / plain wall {spread(ratios['hash'])} "
                    f"(target <= 3% wall)  [{load()}]",
                    flush=True,
                )
        written = write_run(folder, args.gb, args.rows, print)
        files = shard_files(folder)
        gb = written["bytes"] / 1e9
        sizes = sorted(f.stat().st_size for f in files)
        print(
            f"run: {len(files)} shard files ({written['shards']} encode + {written['shards']} images, "
            f"{sizes[0] / MB:.1f}-{sizes[-1] / MB:.1f} MB), {gb:.2f} GB written in {written['seconds']:.1f} s  "
            f"[{load()}]",
            flush=True,
        )
        for attempt in range(3):  # a loaded machine can time a node's start out
            try:
                ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
                break
            except Exception as error:
                print(f"ray.init failed ({error}); again", flush=True)
                ray.shutdown()
                if attempt == 2:
                    raise
        warm = ray.remote(_import_verify).options(num_cpus=1)
        ray.get([warm.remote() for _ in range(4)])  # worker processes started and curate imported, outside timings
        rows = []
        for attempt in range(1, args.rounds + 1):
            drop_cache(files)
            before = cached_fraction(files)
            cat = time_cat(files)
            drop_cache(files)
            before_verify = cached_fraction(files)
            seconds = time_verify(folder)
            rows.append((cat, seconds))
            print(
                f"cold read {attempt}: cat {gb / cat:.2f} GB/s ({cat:.1f} s, {100 * before:.1f}% cached before), "
                f"verify {gb / seconds:.2f} GB/s ({seconds:.1f} s, {100 * before_verify:.1f}% cached before): "
                f"{cat / seconds:.2f}x  [{load()}]",
                flush=True,
            )
        cat = min(r[0] for r in rows)
        verify = min(r[1] for r in rows)
        median = statistics.median(r[0] / r[1] for r in rows)
        print(
            f"cold, best of each: verify / cat = {cat / verify:.2f}x; median of the rounds' ratios {median:.2f}x "
            "(target >= 0.8x)"
        )
        time_cat(files)
        warm_fraction = cached_fraction(files)
        cat = time_cat(files)
        seconds = time_verify(folder)
        print(
            f"warm ({100 * warm_fraction:.0f}% of the bytes cached): cat {gb / cat:.2f} GB/s, verify "
            f"{gb / seconds:.2f} GB/s: {cat / seconds:.2f}x  [{load()}]"
        )
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
