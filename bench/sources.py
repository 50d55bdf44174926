"""Benchmark: the `webdataset` source against the `webdataset` library reading the same tars and writing the
same Parquet, same machine, same run.

Writes T tars of S samples each (JPEG 300-700 px + .txt + .json, as img2dataset lays them out), then, in
alternating rounds, turns every tar into one image shard
  - ours: the stage's shard function (`curate.stages.webdataset.process`: tarfile member by member, pairing,
    sidecar, decode check with curate.images, metadata columns) and the runner's atomic Parquet write;
  - reference: `webdataset.WebDataset(tar)` (its tar iterator and `group_by_keys`, raw bytes), the same
    decode check, SHA-256 and metadata columns on a thread pool of the same size, `pq.write_table` with the
    same writer options.
Both run in this process, one tar after another, so the ratio compares the reading code, not scheduling.
A second line times the reading alone (tar -> samples with their bytes), where the decode does not dominate.
Prints samples/s of each and ours / reference (target >= 0.9). Run: `.venv/bin/python bench/sources.py
[--tars 6] [--samples 300] [--rounds 3] [--threads 4]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def cpu_header() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "# lscpu not available"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("sse4_2", "avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"# cpu: {model}; {os.cpu_count()} cores; flags: {' '.join(wanted) or '-'}"


def make_tars(folder: Path, tars: int, samples: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = np.asarray(Image.open(io.BytesIO(_photo())).convert("RGB"))
    paths = []
    for t in range(tars):
        path = folder / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                key = f"{t:05d}{i:04d}"
                width, height = (int(v) for v in rng.integers(300, 701, 2))
                top, left = (int(v) for v in rng.integers(0, 100, 2))
                image = Image.fromarray(base[top : top + 400, left : left + 400]).resize((width, height))
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "similarity": 0.3,
                        "original_width": width, "original_height": height}  # fmt: skip
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", f"caption {key}".encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _photo() -> bytes:
    try:
        from skimage import data

        image = Image.fromarray(data.astronaut())
    except Exception:
        rng = np.random.default_rng(1)
        image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).resize((512, 512))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def run_ours(paths: list[Path], out: Path, threads: int) -> int:
    from curate import storage
    from curate.ingest.tar_plan import TarPart
    from curate.runfolder import ShardTask
    from curate.schema import parquet_options
    from curate.stages.spec import WorkContext
    from curate.stages.webdataset import WebDatasetConfig, process

    config = WebDatasetConfig(kind="webdataset", path=[str(p) for p in paths], threads=threads)
    context = WorkContext(str(out), "ingest", None)
    rows = 0
    for i, path in enumerate(paths):
        table = process(config, ShardTask(i, (TarPart(str(path)).encode(),)), context, None).table
        storage.write_parquet_atomic(str(out / f"ours-{i:05d}.parquet"), table, **parquet_options(table))
        rows += table.num_rows
    return rows


def run_reference(paths: list[Path], out: Path, threads: int) -> int:
    import webdataset as wds

    from curate.images import ImageError, open_image
    from curate.schema import WEBDATASET_SCHEMA, make_key, parquet_options

    def check(data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        try:
            decoded = open_image(data)
        except ImageError as e:
            return {"status": e.status, "error": e.message, "sha256": sha}
        width, height = decoded.image.size
        return {"image": data, "format": decoded.format, "width": width, "height": height, "sha256": sha,
                "status": "ok", "error": None}  # fmt: skip

    rows = 0
    for i, path in enumerate(paths):
        samples = list(wds.WebDataset(str(path), shardshuffle=False))
        with ThreadPoolExecutor(threads) as pool:
            checked = list(pool.map(lambda s: check(s["jpg"]), samples))
        records, metas = [], []
        for sample, image in zip(samples, checked, strict=True):
            meta = json.loads(sample["json"])
            row = {"key": make_key(f"{path}#{sample['__key__']}"), "url": meta.get("url"),
                   "caption": sample["txt"].decode().strip(), "source": str(path), "source_key": sample["__key__"],
                   "source_members": [f"{sample['__key__']}.{e}" for e in ("jpg", "txt", "json")], **image}  # fmt: skip
            if image["status"] == "ok":
                row["original_width"], row["original_height"] = meta["original_width"], meta["original_height"]
            records.append(row)
            metas.append(meta)
        table = pa.Table.from_pylist(records, schema=WEBDATASET_SCHEMA)
        for name in ("key", "status", "similarity"):
            table = table.append_column(
                "input_" + name if name != "similarity" else name, pa.array([m[name] for m in metas])
            )
        pq.write_table(table, out / f"ref-{i:05d}.parquet", **parquet_options(table))
        rows += table.num_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tars", type=int, default=6)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    print(cpu_header())
    print(
        f"# python {sys.version.split()[0]}, {args.tars} tars x {args.samples} samples, decode threads {args.threads}"
    )
    import webdataset

    from curate.ingest.tars import read_tar
    from curate.stages import webdataset as _stage  # noqa: F401  (imports outside the timing)

    print(f"# webdataset {webdataset.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        paths = make_tars(folder, args.tars, args.samples)
        size = sum(p.stat().st_size for p in paths)
        print(f"# wrote {size / 1e6:.1f} MB of tars in {time.perf_counter() - started:.1f} s")
        warm = folder / "warm"
        warm.mkdir()
        run_ours(paths[:1], warm, args.threads)  # first-use costs (imports, thread pools) outside the timing
        run_reference(paths[:1], warm, args.threads)
        ours_rates, ref_rates = [], []
        for round_ in range(args.rounds):
            sides = [("ours", run_ours, ours_rates), ("reference", run_reference, ref_rates)]
            for name, function, rates in sides if round_ % 2 == 0 else sides[::-1]:  # alternate who goes first
                out = folder / f"out-{name}-{round_}"
                out.mkdir()
                started = time.perf_counter()
                rows = function(paths, out, args.threads)
                seconds = time.perf_counter() - started
                rates.append(rows / seconds)
                print(f"round {round_} {name:<9} {rows} samples in {seconds:6.2f} s: {rows / seconds:7.1f} samples/s")
            a = pq.read_table(
                folder / f"out-ours-{round_}" / "ours-00000.parquet", columns=["key", "sha256", "caption"]
            )
            b = pq.read_table(
                folder / f"out-reference-{round_}" / "ref-00000.parquet", columns=["key", "sha256", "caption"]
            )
            assert a.equals(b), "the two paths wrote different rows"
        read_ours, read_ref = [], []  # the reading alone: tar -> samples with their bytes, no decode, no Parquet
        for _ in range(args.rounds):
            started = time.perf_counter()
            count = sum(len(read_tar(str(p)).samples) for p in paths)
            read_ours.append(count / (time.perf_counter() - started))
            started = time.perf_counter()
            count = sum(len(list(webdataset.WebDataset(str(p), shardshuffle=False))) for p in paths)
            read_ref.append(count / (time.perf_counter() - started))
        ours_read, ref_read = statistics.median(read_ours), statistics.median(read_ref)
        print(f"reading only (tar -> samples), median: ours {ours_read:,.0f} samples/s, webdataset {ref_read:,.0f}"
              f" samples/s, ratio {ours_read / ref_read:.2f}x")  # fmt: skip
        ours, ref = statistics.median(ours_rates), statistics.median(ref_rates)
        print(f"webdataset source (median of {args.rounds}): {ours:.1f} samples/s")
        print(f"webdataset library + same checks and Parquet (median): {ref:.1f} samples/s")
        print(f"ratio ours / reference: {ours / ref:.2f}x (target >= 0.9)")


if __name__ == "__main__":
    main()
