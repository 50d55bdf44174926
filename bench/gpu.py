"""What each GPU stage's own code does per GPU, beside its bare model, at real model sizes (random weights).

    python bench/gpu.py --size tiny                     # the same code on tiny models, on the CPU, in seconds
    python bench/gpu.py --size real --budget-s 420 --out $OUT/gpu.md   # one GPU, inside 8 minutes
    python bench/gpu.py --size real --device cpu --dry-run   # every real-size model built once, one batch each

docs/performance.md has the one command that runs it on the GPU machine (with the wheels bench/gpu_carry.sh
fetches: that machine has no Ray, diffusers, open_clip or pydantic). No Ray here either: each row calls its
stage's `setup` and `process` on an ingest shard directly (the code a Ray actor runs), never the runner.

Rows (images/s per GPU, steps/s for training, rows/s for dedup):
  sscd       the sscd stage (decode + resize on threads, SSCD ResNet-50 TorchScript at 320 px) vs the module alone
  score      the score stage (open_clip ViT-L/14 + aesthetic and NSFW heads) vs encode_image + encode_text
  encode R   the encode stage at base resolution R (512, 1024) vs the sum of its bare models, each also a row:
             the SD3 VAE encoder at R, CLIP-L, OpenCLIP bigG, T5-XXL (bf16)
  caption    the caption stage (Qwen2.5-VL-3B config, transformers generate, a fixed number of new tokens) vs
             generate on processor outputs made beforehand, with tokens/s of both
  train      the reference trainer (MMDiT at SD3-medium width, depth 24) reading encode shards vs batches in memory
  dedup      the in-memory dedup global step with torch products on the GPU vs the CPU path (decisions compared)
Each row also has peak GPU memory (torch.cuda.max_memory_allocated), FLOPs per item counted once with
torch.utils.flop_counter.FlopCounterMode (on meta tensors where the model allows), the achieved FLOP/s and its
share of the chip's dense bf16 peak (`--peak-tflops`; 989 for an H100/H200 SXM by the datasheet; the header also
prints a bf16 matmul measured in the same run). A row that fails prints its error; the others still run.

`--budget-s` splits the time left among the rows by weight; each row times a first batch of its stage and its
bare model, then measures as many items as fit its share (printing what was cut). Models are built on the GPU in
bf16 and saved in their real formats (safetensors, TorchScript), then loaded by the stages' own loading code.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the sibling modules, also when this file is loaded by path (the test suite)
    sys.path.insert(0, str(BENCH))

from gpu_common import Ctx, Row, Sizes, prepare_pool, reset_memory  # noqa: E402

TINY = Sizes(
    name="tiny",
    images=3,
    image_side=(48, 96),
    aspect=1.0,
    sscd_trunk="resnet18",
    sscd_size=64,
    sscd_batch=3,
    sscd_items=3,
    clip="tiny",
    score_batch=3,
    score_items=3,
    sd3="tiny",
    encode=((64, 3, 3),),
    vlm="tiny",
    caption_batch=3,
    caption_items=3,
    new_tokens=3,
    mmdit_depth=1,
    train_resolution=64,
    train_batch=2,
    train_steps=1,
    dedup_rows=1500,
    repeats=1,
    warmup=False,
    dtype="float32",
)
REAL = Sizes(
    name="real",
    images=256,
    image_side=(384, 1024),
    aspect=2.0,
    sscd_trunk="resnet50",
    sscd_size=320,
    sscd_batch=256,
    sscd_items=4096,
    clip="ViT-L-14-quickgelu",
    score_batch=256,
    score_items=4096,
    sd3="full",
    encode=((512, 32, 1024), (1024, 16, 256)),
    vlm="3b",
    caption_batch=32,
    caption_items=512,
    new_tokens=64,
    mmdit_depth=24,
    train_resolution=512,
    train_batch=16,
    train_steps=20,
    dedup_rows=500_000,
    repeats=2,
    warmup=True,
    dtype="bfloat16",
)


def dry_sizes() -> Sizes:
    """Real widths where this CPU can hold them, one batch of two: T5-XXL and the VLM cut to one or two layers."""
    from curate.testing.tiny_sd3 import SIZES

    return replace(
        REAL,
        name="real (dry run)",
        images=4,
        image_side=(256, 512),
        sscd_batch=2,
        sscd_items=2,
        score_batch=2,
        score_items=2,
        sd3=replace(SIZES["full"], t5=(4096, 2, 64, 10240)),
        encode=((128, 2, 2),),
        vlm="3b-cut",
        caption_batch=2,
        caption_items=2,
        new_tokens=2,
        dedup_rows=20_000,
        repeats=1,
        warmup=False,
        dtype="float32",
    )


STAGES = ("sscd", "score", "encode", "caption", "train", "dedup")
WEIGHTS = {"sscd": 1.0, "score": 1.0, "encode": 2.0, "caption": 2.5, "train": 1.5, "dedup": 1.0}


def bench(name: str):
    import gpu_images
    import gpu_train

    return {
        "sscd": gpu_images.bench_sscd,
        "score": gpu_images.bench_score,
        "encode": gpu_images.bench_encode,
        "caption": gpu_images.bench_caption,
        "train": gpu_train.bench_train,
        "dedup": gpu_train.bench_dedup,
    }[name]


# -- the header: where the figures come from ------------------------------------------------------------------------


def matmul_tflops(device: str) -> tuple[str, float]:
    """A dense matmul measured here: 8192^3 bf16 on a GPU (the ceiling the utilisation is read against), 1024^3
    float32 on a CPU."""
    import torch

    if device.startswith("cuda"):
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        return "bf16 8192^3", 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    started = time.perf_counter()
    for _ in range(3):
        a @ b
    return "fp32 1024^3", 3 * 2 * 1024**3 / (time.perf_counter() - started) / 1e12


def header(ctx: Ctx, peak: float | None) -> tuple[list[str], float]:
    import torch

    lines = [f"# bench/gpu.py --size {ctx.sizes.name}, {time.strftime('%Y-%m-%d %H:%M %Z')}, host {platform.node()}"]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    lines.append(
        f"# CPU: {info.get('Model name', '?').strip()}, {os.cpu_count()} CPUs ({ctx.cpus} used for decoding); "
        f"flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}; "
        f"load average {tuple(round(x, 2) for x in os.getloadavg())}"
    )
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in ("transformers", "diffusers", "open_clip_torch", "pyarrow", "pydantic"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    lines.append("# " + ", ".join(versions))
    label, measured = matmul_tflops(ctx.device)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        name = props.name
        lines.append(f"# GPU: {name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        default = 989.0 if any(chip in name for chip in ("H100", "H200")) else measured
    else:
        lines.append("# GPU: none (device cpu)")
        default = measured
    peak = peak or default
    lines.append(
        f"# matmul measured here: {label} {measured:.3g} TFLOP/s; utilisation below is against {peak:.3g} TFLOP/s"
        + (" (dense bf16 datasheet peak)" if peak == 989.0 else "")
    )
    return lines, peak


# -- the table ------------------------------------------------------------------------------------------------------

HEADINGS = "stage, model, unit, items, stage /s, bare /s, stage/bare, GPU GiB, GFLOP/item, TFLOP/s, % peak, note"
COLUMNS = "| " + HEADINGS.replace(", ", " | ") + " |"


def _number(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


def table_line(row: Row, peak: float) -> str:
    rate = row.stage_rate if row.stage_rate is not None else row.bare_rate
    achieved = row.flops * rate / 1e12 if row.flops and rate else None
    ratio = row.stage_rate / row.bare_rate if row.stage_rate and row.bare_rate else None
    cells = [
        row.stage,
        row.model,
        row.unit,
        str(row.items),
        _number(row.stage_rate, 2),
        _number(row.bare_rate, 2),
        f"{ratio:.2f}" if ratio is not None else "-",
        f"{row.memory / 2**30:.1f}" if row.memory else "-",
        _number(row.flops / 1e9 if row.flops else None),
        _number(achieved, 2),
        f"{100 * achieved / peak:.1f}" if achieved is not None else "-",
        (f"ERROR {row.error}; " if row.error else "") + row.note,
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def write_table(path: Path, header_lines: list[str], rows: list[Row], peak: float, ending: str) -> None:
    body = [*header_lines, "", COLUMNS, "|" + " --- |" * (COLUMNS.count(" | ") + 1)]
    path.write_text("\n".join([*body, *(table_line(r, peak) for r in rows), ending]) + "\n")


def print_floors(sizes: Sizes, peak: float) -> None:
    """Each model's FLOPs per item (counted on meta) and its floor: GPU-hours per 1e8 items at the whole peak."""
    from gpu_flops import all_flops

    print(f"# FLOPs per item at --size {sizes.name} (FlopCounterMode, meta tensors); floor at {peak:.0f} TFLOP/s")
    print("| model | per | parameters | GFLOP | floor: GPU-hours per 1e8 |\n| --- | --- | ---: | ---: | ---: |")
    for name, unit, flops, parameters in all_flops(sizes):
        floor = 1e8 * flops / (peak * 1e12) / 3600
        print(f"| {name} | {unit} | {parameters / 1e6:,.0f}M | {flops / 1e9:,.1f} | {floor:,.2f} |")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--dry-run", action="store_true", help="real sizes: build each model once, one batch each")
    parser.add_argument("--flops-only", action="store_true", help="FLOPs per item of each model (meta), and floors")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's seconds (default: none)")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated rows of {','.join(STAGES)}")
    parser.add_argument("--cpus", type=int, default=None, help="decode threads and actor CPUs (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak")
    parser.add_argument("--models", type=Path, default=None, help="prebuilt tiny models (curate tiny-models)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (JSON) here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every loader picks cuda when it sees one
    import torch

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        parser.error("--device cuda: no GPU is visible")
    if args.dry_run and args.size != "real":
        parser.error("--dry-run builds the real sizes: use it with --size real")
    sizes = dry_sizes() if args.dry_run else {"tiny": TINY, "real": REAL}[args.size]
    if args.flops_only:
        print_floors(sizes, args.peak_tflops or 989.0)
        return []
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(
        sizes=sizes,
        device=device,
        work=work,
        cpus=args.cpus or len(os.sched_getaffinity(0)),
        deadline=started + (args.budget_s or 10**9),
        dry_run=args.dry_run,
        models=args.models,
        log=lambda line: print(line, flush=True),
    )
    lines, peak = header(ctx, args.peak_tflops)
    for line in lines:
        ctx.log(line)
    prepare_pool(ctx)
    names = [n for n in STAGES if n in args.only.split(",")]
    rows: list[Row] = []
    ctx.log(COLUMNS)
    ctx.log("|" + " --- |" * (COLUMNS.count(" | ") + 1))
    for i, name in enumerate(names):
        weight_left = sum(WEIGHTS[n] for n in names[i:])
        budget_end = time.perf_counter() + max(0.0, ctx.left()) * WEIGHTS[name] / weight_left
        reset_memory(ctx)
        row_started, row_cpu = time.perf_counter(), time.process_time()
        try:
            if ctx.left() <= 0:
                raise TimeoutError(f"skipped: the {args.budget_s:.0f} s budget was spent by the rows before")
            new = bench(name)(ctx, budget_end)
        except Exception as e:
            traceback.print_exc()
            new = [Row(name, "-", error=f"{type(e).__name__}: {e}"[:300])]
        seconds, cpu = time.perf_counter() - row_started, time.process_time() - row_cpu
        new[0].note = "; ".join(filter(None, [new[0].note, f"the row: {seconds:.0f} s, {cpu:.0f} CPU s"]))
        for row in new:
            ctx.log(table_line(row, peak))
        rows += new
        reset_memory(ctx)
        if args.out:  # after every row: a run stopped at its time limit keeps what it measured
            write_table(args.out, lines, rows, peak, f"# {len(rows)} rows after {time.perf_counter() - started:.0f} s")
    total = time.perf_counter() - started
    ending = f"# {len(rows)} rows in {total:.0f} s; load average {tuple(round(x, 2) for x in os.getloadavg())}"
    ctx.log(ending)
    if args.out:
        write_table(args.out, lines, rows, peak, ending)
    if args.json:
        args.json.write_text(json.dumps({"header": lines, "peak_tflops": peak, "rows": [asdict(r) for r in rows]}))
    return rows


if __name__ == "__main__":
    failed = [r for r in main() if r.error]
    sys.exit(1 if failed else 0)
