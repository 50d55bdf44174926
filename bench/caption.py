"""Caption stage throughput against a plain transformers generate loop, per VLM family, measured in the same run;
or (`--servers`) the stage's server client against the servers' capacity and against the batch-at-a-time client.

    python bench/caption.py                          # CPU, Qwen2-VL, small random weights (~2 minutes)
    python bench/caption.py --family all             # every family the stage drives, one table
    python bench/caption.py --family gemma3,florence2 --images 24
    python bench/caption.py --size 2b --images 256 --batch-size 32 --max-new-tokens 64   # Qwen2-VL-2B layout, GPU
    python bench/caption.py --servers                # 2 engine-model servers, the streaming client (~1.5 minutes)

Each family is a random-weight model of its real architecture (curate.testing.tiny_vlms; `small`: a
128-wide, 2-layer language model), loaded through the stage's loading path, prompted the way
configs/captioners.yaml prompts it. Both sides caption the same images with the same weights, batch size,
prompt and greedy settings:

- reference: images decoded beforehand (not timed), then `processor(...)` -> `model.generate` ->
  `batch_decode` of the new tokens, batch after batch: the loop a user would write;
- stage: the caption stage's `process` on an image shard, timed whole: it reads the Parquet shard,
  decodes the images, preprocesses, generates, cleans the text and builds the output table.

Runs alternate (stage, reference, reference with decoding, ...) and the best of each is reported, so a noisy
shared machine penalises neither side. "wait" is the share of the stage's model loop spent waiting for the
next prepared batch (decode + processor running in background threads); near 0 means the model never starves.

`--servers`: two servers (`curate.testing.openai_server`'s engine model: up to `--slots` sequences at once, each
costing `--prefill-s` plus `--step-s` per token, caption lengths varied by image between `--min-tokens` and
`--max-tokens`), started through the stage's own server launcher (`ServerProcess`, the command template and
launcher a managed vLLM gets). `--workers` threads play the stage's caption workers, each running the stage's
`process` on its shards with its own client, as each Ray actor would; the stage's rate is rows over wall time,
shard reads, decoding and tails included. The servers' capacity is measured in the same run: the same requests,
encoded beforehand, fired by a load generator that keeps 4 x slots in flight on each server (their nominal
capacity, servers x slots / mean seconds per request from their own accounts, is shown beside). The reference is
the client the stage had before: batches of `--batch-size` requests per worker, each batch waited for in full, to
one base URL (all it could take).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from image_shard import write_image_shard
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cpu_header() -> str:
    """The CPU model and the flags that decide matrix speed (lscpu), for the header."""
    try:
        info = dict(
            line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        )
    except (OSError, ValueError):
        return "cpu: lscpu unavailable"
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    have = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    return f"cpu: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: {have}"


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Real sample photos (the demo set) plus noise images of mixed sizes, as JPEG/PNG files."""
    from curate.samples import write_samples

    write_samples(folder)
    rng = np.random.default_rng(seed)
    have = len([p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp")])
    for i in range(max(0, count - have)):
        w, h = int(rng.integers(160, 900)), int(rng.integers(160, 900))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(folder / f"noise-{i:04d}.jpg", quality=90)


def reference_loop(captioner, images, batch_size, max_new_tokens):
    """The plain transformers loop: returns (captions, seconds)."""
    import torch

    model, processor, prompt = captioner.model, captioner.processor, captioner.text_prompt
    captions = []
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(
            images=[[i] for i in batch], text=[prompt] * len(batch), padding=True, return_tensors="pt"
        ).to(model.device)
        inputs.pop("labels", None)  # PaliGemma's processor returns training labels
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, 1:] if model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1] :]
        captions += processor.batch_decode(new, skip_special_tokens=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return captions, time.perf_counter() - started


def bench_family(family: str, args, work: Path, run, dtype: str) -> dict:
    import torch

    from curate import storage
    from curate.caption.vlm import Captioner
    from curate.config import ModelSpec, Resources
    from curate.images import open_image
    from curate.runfolder import ShardTask
    from curate.stages.caption import CaptionConfig, process
    from curate.stages.spec import WorkContext
    from curate.testing.tiny_vlm import QWEN2_VL_2B, build_tiny_qwen2_vl
    from curate.testing.tiny_vlms import BUILDERS
    from curate.testing.vlm_parts import SMALL

    cuda = torch.cuda.is_available()
    if args.size == "2b":
        model_dir = build_tiny_qwen2_vl(
            work / family, QWEN2_VL_2B, max_pixels=28 * 28 * 256, initializer_range=0.02, dtype=dtype
        )
    else:
        model_dir = BUILDERS[family](work / family, SMALL)
    entry = yaml.safe_load((REPO / "configs" / "captioners.yaml").read_text())[family]["caption"]
    stage_fields = {k: v for k, v in entry.items() if k in ("prompt", "task_prompt", "system_prompt")}
    spec = ModelSpec(path=str(model_dir), dtype=dtype)
    config = CaptionConfig(
        kind="caption",
        decode_threads=args.decode_threads,
        max_new_tokens=args.max_new_tokens,
        resources=Resources(batch_size=args.batch_size),
        **stage_fields,
    )
    captioner = Captioner(spec, config.loading(), config.generation())
    context = WorkContext(run.uri, "caption", run.stage("ingest").uri, {"captioner": spec})
    task = ShardTask(0, (run.stage("ingest").shard(0),))

    def decode_all() -> list[Image.Image]:  # the same decoded, size-capped images the stage feeds its processor
        table = storage.read_parquet(run.stage("ingest").shard(0), columns=["image", "status"])
        images = []
        for data, status in zip(table["image"].to_pylist(), table["status"].to_pylist(), strict=True):
            if status == "ok":
                image = open_image(data).image
                image.thumbnail((config.max_image_side, config.max_image_side), Image.Resampling.BICUBIC)
                images.append(image)
        return images

    decoded = decode_all()
    reference_loop(captioner, decoded[: args.batch_size], args.batch_size, 4)  # warm-up
    times: dict[str, list[float]] = {"ref": [], "ref+decode": [], "stage": []}
    waits = []
    stage_rows = ref_captions = None
    for _ in range(args.repeats):  # interleaved, so load changes hit every path alike
        started = time.perf_counter()
        output = process(config, task, context, captioner)
        if cuda:
            torch.cuda.synchronize()
        times["stage"].append(time.perf_counter() - started)
        extra = output.extra
        waits.append(extra["input_wait_seconds"] / max(1e-9, extra["input_wait_seconds"] + extra["generate_seconds"]))
        stage_rows = output.table
        ref_captions, seconds = reference_loop(captioner, decoded, args.batch_size, args.max_new_tokens)
        times["ref"].append(seconds)
        started = time.perf_counter()
        reference_loop(captioner, decode_all(), args.batch_size, args.max_new_tokens)
        times["ref+decode"].append(time.perf_counter() - started)
    generated = [r for r in stage_rows.to_pylist() if r["tokens_generated"] is not None]
    n = len(decoded)
    return {
        "family": family,
        "images": n,
        "best": {path: min(seconds) for path, seconds in times.items()},
        "wait": statistics.median(waits),
        # the stage orders a shard's images by size; compare as multisets of (raw text)
        "same": sum(min(a, b) for a, b in _counts([r["caption_raw"] for r in generated], ref_captions)),
        "ok": sum(r["status"] == "ok" for r in generated),
        "tokens": sum(r["tokens_generated"] for r in generated),
    }


def _counts(left: list[str], right: list[str]) -> list[tuple[int, int]]:
    keys = set(left) | set(right)
    return [(left.count(k), right.count(k)) for k in keys]


# ----------------------------------------------------------------------------------------------------
# --servers: the streaming client against two engine-model servers


def start_servers(args, log_dir: Path, tag: str) -> list:
    from curate.caption.server_process import ServerProcess
    from curate.caption.servers import ServersConfig

    engine = (
        "{python} -m curate.testing.openai_server --host {host} --port {port} --served-model-name {served_model_name} "
        f"--slots {args.slots} --prefill-s {args.prefill_s} --step-s {args.step_s} "
        f"--min-tokens {args.min_tokens} --max-tokens {args.max_tokens}"
    )
    config = ServersConfig(engine="command", command=engine, model=tag, num_gpus=0, replicas=2, host="127.0.0.1")
    servers = [ServerProcess(config.spec(None), i, str(log_dir)) for i in range(2)]
    for server in servers:
        server.wait_ready(60)
    return servers


def server_stats(urls: list[str]) -> list[dict]:
    import json
    import urllib.request

    out = []
    for url in urls:
        with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/stats", timeout=30) as response:
            out.append(json.loads(response.read()))
    return out


def capacity(before: list[dict], after: list[dict], slots: int) -> tuple[float, float, int]:
    """(requests/s the servers can serve, mean seconds per request, requests) over a phase, from their accounts."""
    done = sum(a["completed"] - b["completed"] for a, b in zip(after, before, strict=True))
    busy = sum(a["busy_seconds"] - b["busy_seconds"] for a, b in zip(after, before, strict=True))
    mean = busy / max(1, done)
    return len(after) * slots / mean, mean, done


def run_workers(work, workers: int) -> float:
    """``work(i)`` on ``workers`` threads at once; the wall seconds until the last one finished."""
    import threading

    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def batch_at_a_time(url: str, model: str, options, images: list, batch_size: int) -> int:
    """The client the stage had before: each batch's requests sent at once, the next batch after the whole batch
    is answered (one base URL, urllib, a thread per request in flight)."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from curate.caption.client import ClientConfig, encode_image, request_body

    config = ClientConfig(model=model)

    def one(image) -> bool:
        body = request_body(model, options, encode_image(image, config, None))
        request = urllib.request.Request(url + "/chat/completions", data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=600) as response:
            return bool(json.loads(response.read())["choices"])

    done = 0
    with ThreadPoolExecutor(batch_size) as pool:
        for start in range(0, len(images), batch_size):
            done += sum(pool.map(one, images[start : start + batch_size]))
    return done


def saturate(urls: list[str], bodies: list[bytes], in_flight: int) -> None:
    """Every body sent once, ``in_flight`` at a time on each server: the servers' capacity, with no client work."""
    import asyncio

    import aiohttp

    async def main() -> None:
        queue = list(reversed(bodies))

        async def lane(session, url: str) -> None:
            while queue:
                body = queue.pop()
                async with session.post(url + "/chat/completions", data=body) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            await asyncio.gather(*(lane(session, url) for url in urls for _ in range(in_flight)))

    asyncio.run(main())


def bench_servers(args) -> None:
    import os
    import uuid

    from curate import storage
    from curate.caption.client import ClientConfig
    from curate.caption.stream import StreamCaptioner
    from curate.images import open_image
    from curate.runfolder import ShardTask
    from curate.stages.caption import CaptionConfig, process
    from curate.stages.spec import WorkContext

    work = Path(tempfile.mkdtemp(prefix="bench-caption-servers-"))
    rng = np.random.default_rng(0)
    (work / "images").mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(work / "images" / f"im-{i:05d}.jpg")
    run = write_image_shard(work / "run", work / "images", captions="none")
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    servers = start_servers(args, work / "servers", tag)
    urls = [s.url for s in servers]
    print(cpu_header())
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    service = args.prefill_s + args.step_s * (args.min_tokens + args.max_tokens) / 2
    print(
        f"2 servers x {args.slots} slots, {args.prefill_s} s prefill + {args.step_s} s per token, captions of "
        f"{args.min_tokens}-{args.max_tokens} tokens (~{service:.2f} s each); {args.workers} workers; "
        f"stage: shards of {args.images} images, {args.shards} per worker, max_in_flight {args.max_in_flight} per "
        f"server and worker; reference: batch_size {args.batch_size}, one base URL"
    )
    print()
    config = CaptionConfig(
        kind="caption",
        backend="openai",
        endpoints=tuple(urls),
        client=ClientConfig(model=tag, max_in_flight=args.max_in_flight),
        max_new_tokens=args.max_tokens,
        decode_threads=args.decode_threads,
    )
    context = WorkContext(run.uri, "caption", run.stage("ingest").uri, services=urls)
    task = ShardTask(0, (run.stage("ingest").shard(0),))
    clients = [
        StreamCaptioner(urls, tag, config.generation(), config.client, "bench", args.decode_threads)
        for _ in range(args.workers)
    ]

    extras: list[dict] = []

    def stage_worker(i: int) -> None:
        for _ in range(args.shards):
            output = process(config, task, context, clients[i])
            assert set(output.table["status"].to_pylist()) == {"ok"}, output.extra
            extras.append(output.extra)

    images = []
    table = storage.read_parquet(run.stage("ingest").shard(0), columns=["image"])
    for data in table["image"].to_pylist():
        images.append(open_image(data).image)

    def reference_worker(i: int) -> None:
        assert batch_at_a_time(urls[0], tag, config.generation(), images, args.batch_size) == len(images)

    from curate.caption.client import encode_image, request_body

    stage_rows = args.workers * args.shards * args.images
    bodies = [request_body(tag, config.generation(), encode_image(im, config.client, None)) for im in images]
    bodies = (bodies * (stage_rows // len(bodies) + 1))[:stage_rows]
    rows = {}
    for name, worker, count, workers in (
        ("servers' capacity (load generator)", lambda i: saturate(urls, bodies, 4 * args.slots), stage_rows, 1),
        ("stage (streaming client)", stage_worker, stage_rows, args.workers),
        ("batch-at-a-time client", reference_worker, args.workers * args.images, args.workers),
    ):
        before = server_stats(urls)
        wall = run_workers(worker, workers)
        nominal, mean, done = capacity(before, server_stats(urls), args.slots)
        assert done == count, (done, count)
        rows[name] = (count, wall, count / wall, nominal, mean)
    measured = rows["servers' capacity (load generator)"][2]
    reference_rate = rows["batch-at-a-time client"][2]
    print("| client | rows | wall s | rows/s | of measured capacity | nominal capacity rows/s | vs batch-at-a-time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (count, wall, rate, nominal, mean) in rows.items():
        print(
            f"| {name} | {count} | {wall:.1f} | {rate:.1f} | {rate / measured:.3f}x | "
            f"{nominal:.1f} ({mean:.3f} s/request) | {rate / reference_rate:.2f}x |"
        )
    share = rows["stage (streaming client)"][2] / measured
    total = {k: round(sum(e[k] for e in extras), 2) for k in ("seconds", "generate_seconds", "input_wait_seconds")}
    print()
    print(
        f"stage shards: {len(extras)}, seconds {total['seconds']} (streaming {total['generate_seconds']}, of which "
        f"waiting for an encoded image {total['input_wait_seconds']}), in flight at most "
        f"{max(e['in_flight_peak'] for e in extras)} per worker, retries {sum(e['retries'] for e in extras)}"
    )
    verdict = "met" if share >= 0.95 else "MISSED"
    print(f"target: the stage at >= 0.95x of the servers' measured capacity: {verdict} ({share:.3f}x)")
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for server in servers:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_vl", help="model_type(s), comma-separated, or all")
    parser.add_argument("--size", choices=["small", "2b"], default="small", help="2b: Qwen2-VL-2B layout only")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16; default: bf16 on GPU")
    servers = parser.add_argument_group("--servers: the streaming client against two engine-model servers")
    servers.add_argument("--servers", action="store_true")
    servers.add_argument("--slots", type=int, default=16, help="sequences each server runs at once")
    servers.add_argument("--prefill-s", type=float, default=0.02)
    servers.add_argument("--step-s", type=float, default=0.005, help="seconds per generated token")
    servers.add_argument("--min-tokens", type=int, default=8)
    servers.add_argument("--max-tokens", type=int, default=120)
    servers.add_argument("--workers", type=int, default=2, help="caption workers (Ray actors in a real run)")
    servers.add_argument("--shards", type=int, default=3, help="shards per worker")
    servers.add_argument("--max-in-flight", type=int, default=24, help="client.max_in_flight")
    args = parser.parse_args()
    if args.servers:
        if args.images == 48:  # the family benchmark's default: too few for a server run
            args.images = 500
        bench_servers(args)
        return

    import torch

    from curate.testing.tiny_vlms import BUILDERS

    families = list(BUILDERS) if args.family == "all" else args.family.split(",")
    unknown = [f for f in families if f not in BUILDERS]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)} (known: {', '.join(BUILDERS)}, all)")
    if args.size == "2b" and families != ["qwen2_vl"]:
        parser.error("--size 2b builds the Qwen2-VL-2B layout only: use --family qwen2_vl")
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    t0 = time.perf_counter()
    make_images(work / "images", args.images)
    run = write_image_shard(work / "run", work / "images", captions="none")
    where = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)"
    print(cpu_header())
    ready = time.perf_counter() - t0
    print(
        f"{args.images} images, batch {args.batch_size}, {args.max_new_tokens} new tokens, {dtype} on {where}, "
        f"{args.size} random weights, best of {args.repeats} alternating runs (images ready in {ready:.1f}s)"
    )
    print()
    print(
        "| family | images | generate loop s | loop with decoding s | stage s | stage vs loop | "
        "stage vs loop with decoding | stage wait | same text | captions/s (stage) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family in families:
        row = bench_family(family, args, work, run, dtype)
        best, n = row["best"], row["images"]
        print(
            f"| {family} | {n} | {best['ref']:.2f} | {best['ref+decode']:.2f} | {best['stage']:.2f} | "
            f"{best['ref'] / best['stage']:.2f}x | {best['ref+decode'] / best['stage']:.2f}x | {row['wait']:.0%} | "
            f"{row['same']}/{n} | {n / best['stage']:.2f} |",
            flush=True,
        )
    if cuda:
        print(f"captions/s per GPU above: {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
