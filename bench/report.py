"""The run report's cost against the run's size: `curate report` on fabricated run folders.

Each run folder is written through the real writers (curate.testing.run_folder: records, markers, shards in
the stages' schemas, the filter and dedup stages' own reports) with four stages, the last left in progress so
that its every marker is read (the worst case for the funnel's counts). Each build runs as `curate report` in a
fresh process, timed from outside, peak RSS from the process itself. The reference is the smallest run, built
in the same session; every other row prints its ratio to it. Target: 2,000 one-row shards in under 30 s, and
peak memory that does not grow with rows.

    .venv/bin/python bench/report.py [--work /work/scratch/report/bench] [--sizes 200x1,2000x1,200x50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import resource, sys, time
from curate.report import build_report
started = time.perf_counter()
build_report(sys.argv[1])
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def cpu_header() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except OSError:
        return "cpu: lscpu unavailable"
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    have = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    return f"cpu: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: {have}"


def build(run: Path) -> tuple[float, float, int]:
    """(wall seconds of the whole command, seconds inside build_report, peak RSS bytes) of one fresh process."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    inside, rss = out.stdout.split()
    return wall, float(inside), int(rss)


def main() -> None:
    from curate.testing.run_folder import fabricate_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/work/scratch/report/bench")
    parser.add_argument(
        "--sizes", default="200x1,2000x1,200x50", help="SHARDSxROWS_PER_SHARD, the first is the reference"
    )
    parser.add_argument("--repeats", type=int, default=2, help="builds per run folder (the best is kept)")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    work = Path(args.work)
    print(cpu_header())
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print("| shards | rows/shard | rows | fabricated s | build s (command) | build s (in build_report) | peak RSS MB | "
          "time vs ref | RSS vs ref | load |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference = None
    for shards, rows in sizes:
        folder = work / f"run-{shards}x{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        fabricate_run(str(folder), shards, rows)
        made = time.perf_counter() - t0
        best = min((build(folder) for _ in range(args.repeats)), key=lambda r: r[0])
        reference = reference or best
        print(
            f"| {shards:,} | {rows} | {shards * rows:,} | {made:.1f} | {best[0]:.2f} | {best[1]:.2f} | "
            f"{best[2] / 2**20:.0f} | {best[0] / reference[0]:.2f}x | {best[2] / reference[2]:.2f}x | "
            f"{os.getloadavg()[0]:.2f} |",
            flush=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
