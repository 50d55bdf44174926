"""Benchmark: the `download` stage against plain img2dataset, same images, same settings, one run.

Serves N generated JPEGs (300-700 px, each a different crop and size) from a local HTTP server in its
own process, then downloads them alternately with
  - plain ``img2dataset.download`` (multiprocessing distributor, Parquet output), and
  - our stage through ``curate.runner.run_pipeline`` on an already started local Ray (as on a cluster),
with the same processes (Ray task concurrency), threads, shard size and resize settings, and prints
images/s for both and the ratio. Run: ``.venv/bin/python bench/download.py [--images 2400] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SERVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from download_server import Route, serve
folder = Path(sys.argv[1])
routes = {"/" + p.name: Route(p.read_bytes()) for p in folder.glob("*.jpg")}
server = serve("127.0.0.1", routes)
Path(sys.argv[2]).write_text(str(server.port))
while True:
    time.sleep(3600)
"""


def make_images(folder: Path, count: int) -> None:
    import numpy as np
    from download_server import image_bytes

    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = (int(v) for v in rng.integers(300, 701, 2))
        (folder / f"{i:05d}.jpg").write_bytes(image_bytes(width, height, seed=i))


def start_server(folder: Path) -> tuple[subprocess.Popen, int]:
    port_file = folder / "port"
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), str(port_file), str(REPO / "tests")])
    for _ in range(600):
        if port_file.exists() and port_file.read_text():
            return process, int(port_file.read_text())
        time.sleep(0.1)
    raise RuntimeError("the image server did not start")


def write_list(path: Path, port: int, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/{i:05d}.jpg" for i in range(count)]
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"image {i}" for i in range(count)]}), path)


def run_plain(url_list: Path, output: Path, args: argparse.Namespace) -> tuple[int, float, float]:
    import img2dataset
    import pyarrow.parquet as pq

    started = time.perf_counter()
    img2dataset.download(
        url_list=str(url_list),
        output_folder=str(output),
        processes_count=args.processes,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode="border",
        encode_format="jpg",
        encode_quality=95,
        output_format="parquet",
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        number_sample_per_shard=args.shard_size,
        timeout=10,
        retries=0,
        extract_exif=False,  # our stage does not extract EXIF either: same work on both sides
        compute_hash="sha256",
        distributor="multiprocessing",
        enable_wandb=False,
    )
    seconds = time.perf_counter() - started
    ok = sum(
        pq.read_table(p, columns=["status"])["status"].to_pylist().count("success") for p in output.glob("*.parquet")
    )
    shard_seconds = sum(json.loads(p.read_text())["duration"] for p in output.glob("*_stats.json"))
    print(f"  plain: shard seconds {shard_seconds:.1f}", flush=True)
    return ok, seconds, shard_seconds


def pipeline_text(url_list: Path, count_threads: int, args: argparse.Namespace) -> str:
    stage = {
        "kind": "download",
        "urls": str(url_list),
        "url_column": "URL",
        "caption_column": "TEXT",
        "shard_size": args.shard_size,
        "image_size": args.image_size,
        "resize_mode": "border",
        "encode_format": "jpg",
        "encode_quality": 95,
        "timeout": 10,
        "thread_count": count_threads,
        "allow_private_addresses": ["127.0.0.1/32"],
        "resources": {"num_cpus": 1, "concurrency": args.processes},
    }
    return json.dumps({"name": "bench", "output": "unused", "stages": [stage]})


def run_ours(url_list: Path, output: Path, args: argparse.Namespace) -> tuple[int, float, float]:
    from curate.pipeline import parse_pipeline
    from curate.runner import run_pipeline

    pipeline = parse_pipeline(pipeline_text(url_list, args.threads, args), "bench.yaml")
    started = time.perf_counter()
    records = run_pipeline(pipeline, output=str(output), log=lambda line: None)
    seconds = time.perf_counter() - started
    record = records["download"]
    print(
        f"  ours: {record['shards']} shards, worker seconds {record['worker_seconds']:.1f}, "
        f"of which download_seconds {record['extra']['download_seconds']:.1f}",
        flush=True,
    )
    return record["status"].get("ok", 0), seconds, record["worker_seconds"]


def cpu_per_image(port: int, count: int, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """In this process, one shard of ``count`` URLs through plain img2dataset's Downloader + Resizer and
    through our fetch (same thread pool size): CPU ms per image is what other jobs' load distorts least."""
    import pyarrow as pa
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    from curate.download.fetch import _collector, fetch
    from curate.stages.download import DownloadConfig

    urls = [f"http://127.0.0.1:{port}/{i:05d}.jpg" for i in range(count)]

    def plain() -> None:
        with tempfile.TemporaryDirectory() as folder:
            shard = os.path.join(folder, "urls.arrow")
            table = pa.table({"url": urls})
            with pa.OSFile(shard, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            resizer = Resizer(args.image_size, "border", False, encode_quality=95, encode_format="jpg")
            Downloader(
                _collector({}), resizer, args.threads, False, False, folder, ["url"], 10, count, 5, "sha256", None,
                "jpg", 0, None, None,
            ).download_shard((0, shard))  # fmt: skip

    config = DownloadConfig(
        kind="download", urls=["-"], image_size=args.image_size, thread_count=args.threads,
        allow_private_addresses=["127.0.0.1"],
    )  # fmt: skip
    rows = []
    for name, run in (("plain", plain), ("ours", lambda: fetch(urls, config.fetch_settings()))) * args.rounds:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        rows.append((name, (time.process_time() - cpu) / count * 1000, count / (time.perf_counter() - wall)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=300)
    args = parser.parse_args()

    import ray

    from curate.cluster import quiet_ray_data

    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        tmp_path = Path(tmp)
        images = tmp_path / "images"
        images.mkdir()
        started = time.perf_counter()
        make_images(images, args.images)
        print(f"generated {args.images} JPEGs (300-700 px) in {time.perf_counter() - started:.1f} s", flush=True)
        server, port = start_server(images)
        try:
            url_list = tmp_path / "urls.parquet"
            write_list(url_list, port, args.images)
            ray.init(address="local", num_cpus=args.processes, include_dashboard=False, log_to_driver=False)
            quiet_ray_data()
            warm = tmp_path / "warm.parquet"  # start and warm Ray's workers, as on a running cluster
            write_list(warm, port, 64)
            run_ours(warm, tmp_path / "warm-run", argparse.Namespace(**{**vars(args), "shard_size": 32}))
            rows = []
            for r in range(args.rounds):
                plain = run_plain(url_list, tmp_path / f"plain-{r}", args)
                ours = run_ours(url_list, tmp_path / f"ours-{r}", args)
                rows.append((r, *plain, *ours))
            ray.shutdown()
            engine = cpu_per_image(port, min(600, args.images), args)
        finally:
            server.terminate()
            server.wait()

    print()
    print(
        f"{args.images} images, {args.processes} processes x {args.threads} threads, resize border {args.image_size}, "
        f"jpg q95, {args.shard_size} per shard, {os.cpu_count()} cores"
    )
    print("wall: ok images / end-to-end seconds (plain includes spawning its processes; ours runs on a warm Ray)")
    print("shard: ok images / summed shard seconds x processes (download, resize, write; startup excluded)")
    header = f"{'round':>5} {'plain ok':>9} {'ours ok':>8} {'plain wall':>11} {'ours wall':>10} {'ratio':>6}"
    print(header + f" {'plain shard':>12} {'ours shard':>11} {'ratio':>6}   (images/s)")
    totals = [0.0] * 6
    for r, p_ok, p_wall, p_shard, o_ok, o_wall, o_shard in rows:
        pw, ow = p_ok / p_wall, o_ok / o_wall
        ps, os_ = p_ok / p_shard * args.processes, o_ok / o_shard * args.processes
        print(
            f"{r:>5} {p_ok:>9} {o_ok:>8} {pw:>11.1f} {ow:>10.1f} {ow / pw:>6.2f} "
            f"{ps:>12.1f} {os_:>11.1f} {os_ / ps:>6.2f}"
        )
        for i, v in enumerate((p_ok, p_wall, p_shard, o_ok, o_wall, o_shard)):
            totals[i] += v
    p_ok, p_wall, p_shard, o_ok, o_wall, o_shard = totals
    pw, ow = p_ok / p_wall, o_ok / o_wall
    ps, os_ = p_ok / p_shard * args.processes, o_ok / o_shard * args.processes
    print(
        f"{'all':>5} {p_ok:>9.0f} {o_ok:>8.0f} {pw:>11.1f} {ow:>10.1f} {ow / pw:>6.2f} "
        f"{ps:>12.1f} {os_:>11.1f} {os_ / ps:>6.2f}"
    )

    print()
    print(f"in one process, one shard of {min(600, args.images)} URLs, {args.threads} threads (alternating):")
    print(f"{'':>5} {'CPU ms/image':>13} {'images/s':>9}")
    for name, cpu_ms, rate in engine:
        print(f"{name:>5} {cpu_ms:>13.2f} {rate:>9.1f}")
    plain_cpu = sum(c for n, c, _ in engine if n == "plain") / sum(1 for n, *_ in engine if n == "plain")
    ours_cpu = sum(c for n, c, _ in engine if n == "ours") / sum(1 for n, *_ in engine if n == "ours")
    print(f"ratio (plain CPU per image / ours): {plain_cpu / ours_cpu:.2f}")


if __name__ == "__main__":
    main()
