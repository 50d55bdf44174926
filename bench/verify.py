"""What shard checksums cost to write, and how fast `curate verify` reads, against references in the same run.

    flock /work/.heavy.lock .venv/bin/python bench/verify.py --gb 10 --folder /work/scratch/runfolder/bench

Data: a run folder of two stages written through `curate.storage.write_parquet_atomic` exactly as the runner
writes shards (Parquet options from `curate.schema.parquet_options`, a CRC32C computed while writing, then the
marker): `images` (a source: a key and ~60 kB of incompressible bytes per row, like JPEGs) and `latents`
(one shard per `images` shard, same keys: a 16x64x64 float16 latent per row, like SD3 training shards at
512 px). The stage kinds in the pipeline (`local`, `filter`) only decide the lineage rules `curate verify`
applies; the bytes are synthetic.

Reported:
1. Writing: the A/B wall time (target: <= 3%): every other shard also written without a checksum, alternating
   which of the two goes first, median of the ratios; and the CPU time the hashing thread spent against the
   wall time of the shard writes (the CRC runs beside the Parquet encoder, curate.checksums).
2. Reading, cold: every shard file dropped from the page cache (posix_fadvise DONTNEED per file; `fincore`
   confirms), then `cat` of all shard files to /dev/null (the disk's sequential read speed), then, dropped
   again, `curate.verify.verify_stages` on an embedded Ray with 2 CPUs (checksums of every byte, footers, both
   key columns of every latents/images pair). Alternated twice; target: verify >= 0.8x cat.
3. Reading, warm (what fits in the page cache): `cat` and verify again without dropping.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

MB = 1e6
IMAGE_BYTES = 60_000
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
    return "disk: " + " ".join(source.stdout.split()[3:])


class TimedDigest:
    """curate.checksums.Digest, with the seconds spent in its updates counted."""

    def __init__(self):
        from curate.checksums import Digest

        self.inner = Digest()
        self.seconds = 0.0

    def update(self, data: bytes) -> None:
        started = time.perf_counter()
        self.inner.update(data)
        self.seconds += time.perf_counter() - started

    @property
    def size(self) -> int:
        return self.inner.size

    def tagged(self) -> str:
        return self.inner.tagged()


def tables(index: int, rows: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(index)
    keys = [f"{index:06d}-{i:06d}-{rng.integers(1 << 62):016x}" for i in range(rows)]
    images = pa.table(
        {
            "key": keys,
            "image": pa.array([rng.bytes(IMAGE_BYTES) for _ in range(rows)], pa.binary()),
            "status": ["ok"] * rows,
        }
    )
    latent = rng.standard_normal((rows, *LATENT_SHAPE), dtype=np.float32).astype(np.float16).reshape(rows, -1)
    order = rng.permutation(rows)  # training shards group rows by bucket: another order, the same keys
    latents = pa.table(
        {
            "key": pa.array(keys).take(pa.array(order)),
            "latent": pa.array([row.tobytes() for row in latent[order]], pa.binary()),
            "status": ["ok"] * rows,
        }
    )
    return images, latents


def write_run(folder: Path, gb: float, rows: int) -> dict:
    """The two stages; returns the write timings."""
    from curate import storage
    from curate.runfolder import RunDir, ShardStats, summarize
    from curate.schema import parquet_options

    row_bytes = IMAGE_BYTES + int(np.prod(LATENT_SHAPE)) * 2
    shards = max(2, round(gb * 1e9 / (rows * row_bytes)))
    run = RunDir(str(folder / "run"))
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    storage.write_atomic(
        run.pipeline_uri,
        (
            f"name: verify-bench\noutput: {run.uri}\nstages:\n"
            f"  - {{kind: local, name: images, path: {folder / 'inputs'}}}\n"
            f"  - {{kind: filter, name: latents, min_side: 1}}\n"
        ).encode(),
    )
    write_seconds = hash_seconds = 0.0
    ab: list[float] = []
    stats: dict[str, list[ShardStats]] = {"images": [], "latents": []}
    for index in range(shards):
        for name, table in zip(("images", "latents"), tables(index, rows), strict=True):
            stage = run.stage(name)
            options = parquet_options(table)
            digest = TimedDigest()
            started = time.perf_counter()
            size = storage.write_parquet_atomic(stage.shard(index), table, digest=digest, **options)  # type: ignore[arg-type]
            seconds = time.perf_counter() - started
            write_seconds += seconds
            hash_seconds += digest.seconds
            if index % 2 == 0:  # A/B: the same table without a checksum, to a scratch name, alternately after
                plain_uri = storage.join(stage.uri, "ab-plain.parquet")  # and before the one with a checksum
                with_checksum = seconds
                started = time.perf_counter()
                storage.write_parquet_atomic(plain_uri, table, **options)
                plain = time.perf_counter() - started
                if index % 4 == 0:
                    started = time.perf_counter()
                    storage.write_parquet_atomic(stage.shard(index), table, digest=TimedDigest(), **options)  # type: ignore[arg-type]
                    with_checksum = time.perf_counter() - started
                ab.append(with_checksum / plain - 1)
                storage.remove_file(plain_uri)
            marker = ShardStats(index, table.num_rows, {"ok": table.num_rows}, seconds, size, {}, digest.tagged())
            stage.write_marker(marker)
            stats[name].append(marker)
    for name in ("images", "latents"):
        stage = run.stage(name)
        storage.write_json(stage.record_uri, {"kind": "local" if name == "images" else "filter", "shards": shards})
        storage.write_json(stage.success_uri, {"stage": name, **summarize(stats[name])})
    total = sum(s.bytes for group in stats.values() for s in group)
    return {"shards": shards, "bytes": total, "write": write_seconds, "hash": hash_seconds, "ab": ab}


def shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "run").glob("*/shard-*.parquet"))


def drop_cache(files: list[Path]) -> None:
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
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


def time_verify(folder: Path) -> tuple[float, int]:
    from curate.verify import load_run_pipeline, verify_stages

    run_uri = str(folder / "run")
    pipeline = load_run_pipeline(run_uri)
    started = time.perf_counter()
    checks = verify_stages(pipeline, run_uri, log=lambda line: None)
    seconds = time.perf_counter() - started
    problems = sum(len(c.problems or ()) for c in checks)
    return seconds, problems


def _import_verify() -> None:
    import curate.verify  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=10.0, help="size of the run (both stages)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per shard")
    parser.add_argument("--folder", default="/work/scratch/runfolder/bench")
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    args = parser.parse_args()
    import crc32c
    import ray

    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"bench/verify.py: {args.gb:g} GB run, {args.rows} rows per shard, in {folder}")
    print(cpu_header())
    print(disk_header(folder) + f"; crc32c package, hardware CRC instructions: {crc32c.hardware_based}")
    print(f"start: {load()}")
    try:
        written = write_run(folder, args.gb, args.rows)
        files = shard_files(folder)
        gb = written["bytes"] / 1e9
        share = written["hash"] / written["write"]
        ab = statistics.median(written["ab"])
        print(
            f"write: {len(files)} shards, {gb:.2f} GB in {written['write']:.1f} s "
            f"({written['bytes'] / written['write'] / MB:,.0f} MB/s); with vs without checksum, median of "
            f"{len(written['ab'])} A/B pairs: {100 * ab:+.1f}% wall time (target <= 3%); CRC32C thread: "
            f"{written['hash']:.2f} s CPU = {100 * share:.1f}% of the shard-write wall time  [{load()}]"
        )
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
        warm = ray.remote(_import_verify).options(num_cpus=1)
        ray.get([warm.remote() for _ in range(4)])  # worker processes started and curate imported, outside timings
        rows = []
        for attempt in (1, 2):
            drop_cache(files)
            before = cached_fraction(files)
            cat = time_cat(files)
            drop_cache(files)
            before_verify = cached_fraction(files)
            seconds, problems = time_verify(folder)
            assert problems == 0, f"{problems} problems in an undisturbed run"
            rows.append((cat, seconds))
            print(
                f"cold read {attempt}: cat {gb / cat:.2f} GB/s ({cat:.1f} s, {100 * before:.1f}% cached before), "
                f"verify {gb / seconds:.2f} GB/s ({seconds:.1f} s, {100 * before_verify:.1f}% cached before): "
                f"{cat / seconds:.2f}x  [{load()}]"
            )
        cat = min(r[0] for r in rows)
        verify = min(r[1] for r in rows)
        print(f"cold, best of each: verify / cat = {cat / verify:.2f}x (target >= 0.8x)")
        time_cat(files)
        warm = cached_fraction(files)
        cat = time_cat(files)
        seconds, _ = time_verify(folder)
        print(
            f"warm ({100 * warm:.0f}% of the bytes cached): cat {gb / cat:.2f} GB/s, verify {gb / seconds:.2f} GB/s: "
            f"{cat / seconds:.2f}x  [{load()}]"
        )
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
