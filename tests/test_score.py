"""The score stage: its scores equal open_clip called directly; heads, statuses, keep_from and config checks."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from _dedup_support import ONNX_SSCD
from PIL import Image

from curate.config import ConfigError, ModelSpec
from curate.images import open_image
from curate.pipeline import parse_pipeline
from curate.runfolder import ShardTask
from curate.runner import run_pipeline
from curate.schema import IMAGE_SCHEMA, SCORE_SCHEMA
from curate.stages.score import ScoreConfig, process, setup
from curate.stages.spec import WorkContext
from curate.testing.tiny_clip import build_tiny_clip

CAPTIONS = [
    "A cup of coffee with latte art on a saucer.",
    None,  # no caption: scored, but no clip_score
    "   ",  # blank caption: the same
    "a very long caption " * 40,  # longer than CLIP's 77 tokens: truncated by open_clip's tokenizer
    "Portrait of an astronaut in a white spacesuit.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny open_clip model and heads `curate tiny-models` writes, plus heads with hand-set weights."""
    folder = tmp_path_factory.mktemp("score-models")
    paths = build_tiny_clip(folder)
    from safetensors.torch import save_file

    # known by construction: sigmoid(0) = 0.5 and softmax([0, ln 3])[1] = 0.75 for every image
    torch.save({"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}, folder / "half.pth")
    save_file(
        {"weight": torch.zeros(2, 64), "bias": torch.tensor([0.0, math.log(3.0)])}, str(folder / "three.safetensors")
    )
    return {**paths, "half": folder / "half.pth", "three": folder / "three.safetensors", "root": folder}


def _photo(name: str, size: tuple[int, int] | None = None) -> bytes:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if size:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_image_shard(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), path)
    return str(path)


def good_rows() -> list[dict]:
    names = ["coffee", "chelsea", "rocket", "camera", "astronaut"]
    sizes = [None, (300, 120), (97, 203), None, (64, 64)]  # odd shapes: resize + centre crop paths
    rows = []
    for i, (name, size, caption) in enumerate(zip(names, sizes, CAPTIONS, strict=True)):
        data = _photo(name, size)
        w, h = Image.open(io.BytesIO(data)).size
        rows.append({"key": f"k{i}", "image": data, "status": "ok", "caption": caption, "width": w, "height": h})
    return rows


def score_shard(run: Path, rows: list[dict], models: dict[str, ModelSpec], **config) -> pa.Table:
    """setup + process of the stage on one shard, as an actor runs them."""
    upstream = write_image_shard(run / "ingest" / "shard-00000.parquet", rows)
    joined = {}
    if "keep" in config:
        keep = config.pop("keep")
        pq.write_table(pa.table({"key": [r["key"] for r in rows], "keep": keep}), run / "prefilter.parquet")
        (run / "prefilter").mkdir(exist_ok=True)
        (run / "prefilter.parquet").rename(run / "prefilter" / "shard-00000.parquet")
        joined = {"prefilter": str(run / "prefilter")}
        config.update(join=["prefilter"], keep_from="prefilter")
    stage = ScoreConfig(kind="score", **config)
    context = WorkContext(str(run), "score", str(run / "ingest"), models, joined)
    out = process(stage, ShardTask(0, (upstream,)), context, setup(stage, context))
    assert out.table.schema.equals(SCORE_SCHEMA)
    return out.table


def direct_open_clip(model_name: str, pretrained: str | None, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings and CLIP scores computed with open_clip directly, one image at a time."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    embeddings, scores = [], []
    with torch.no_grad():
        for row in rows:
            pixels = preprocess(open_image(row["image"]).image)[None]
            image = model.encode_image(pixels)
            image = image / image.norm(dim=-1, keepdim=True)
            embeddings.append(image[0].numpy())
            caption = row["caption"]
            if caption is None or not caption.strip():
                scores.append(np.nan)
                continue
            text = model.encode_text(tokenizer([caption]))
            text = text / text.norm(dim=-1, keepdim=True)
            scores.append(float((image @ text.T)[0, 0]))
    return np.stack(embeddings), np.array(scores, np.float32)


def _numpy_state(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


def laion_mlp_numpy(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """LAION's MLP by hand: Linear layers 0, 2, 4, 6, 7 in order (dropout is the identity at inference)."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x[:, 0]


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in table[name].to_pylist()], np.float64)


def all_heads(tiny) -> dict[str, ModelSpec]:
    return {
        "clip_scorer": ModelSpec(path=str(tiny["clip"])),
        "aesthetic_head": ModelSpec(path=str(tiny["aesthetic"])),
        "nsfw_head": ModelSpec(path=str(tiny["nsfw"])),
        "watermark_head": ModelSpec(path=str(tiny["watermark"])),
    }


def test_scores_equal_open_clip_called_directly(tiny, tmp_path):
    rows = good_rows()
    table = score_shard(
        tmp_path, rows, all_heads(tiny), keep_embedding=True, resources={"batch_size": 2}, decode_threads=2
    )
    assert table["status"].to_pylist() == ["ok"] * len(rows)
    assert table["key"].to_pylist() == [r["key"] for r in rows]
    assert table["width"].to_pylist() == [r["width"] for r in rows]
    embeddings, clip = direct_open_clip(f"local-dir:{tiny['clip']}", None, rows)

    got_clip = _column(table, "clip_score")
    assert np.isnan(got_clip[[1, 2]]).all()  # no caption, blank caption
    np.testing.assert_allclose(got_clip, clip, atol=2e-5)
    stored = np.stack([np.array(v, np.float32) for v in table["embedding"].to_pylist()])
    np.testing.assert_allclose(stored, embeddings, atol=1e-3)  # float16 storage

    aesthetic = laion_mlp_numpy(_numpy_state(tiny["aesthetic"]), embeddings)
    nsfw_state, wm_state = _numpy_state(tiny["nsfw"]), _numpy_state(tiny["watermark"])
    nsfw = 1 / (1 + np.exp(-(embeddings @ nsfw_state["weight"].T + nsfw_state["bias"])[:, 0]))
    logits = embeddings @ wm_state["weight"].T + wm_state["bias"]
    watermark = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(_column(table, "aesthetic"), aesthetic, atol=2e-5)
    np.testing.assert_allclose(_column(table, "nsfw"), nsfw, atol=2e-6)
    np.testing.assert_allclose(_column(table, "watermark"), watermark, atol=2e-6)
    assert len(set(np.round(_column(table, "aesthetic"), 6))) == len(rows)  # the head sees each image


def test_checkpoint_file_with_model_config_json_loads_the_same_model(tiny, tmp_path):
    """An open_clip training checkpoint + a model-config JSON (add_model_config) = the folder's model."""
    rows = good_rows()[:3]
    models = {"clip_scorer": ModelSpec(path=str(tiny["checkpoint"]), architecture=str(tiny["config_json"]))}
    table = score_shard(tmp_path, rows, models)
    _, clip = direct_open_clip(f"local-dir:{tiny['clip']}", None, rows)
    np.testing.assert_allclose(_column(table, "clip_score"), clip, atol=2e-5)


def test_known_heads_unconfigured_heads_and_bad_rows(tiny, tmp_path):
    rows = [
        *({**row, "caption": "a photo"} for row in good_rows()[1:3]),  # small images, under max_pixels below
        {"key": "corrupt", "image": b"\xff\xd8\xff\xe0garbage", "status": "ok", "caption": "x", "width": 9},
        {"key": "empty", "image": b"", "status": "ok", "caption": "x"},
        {"key": "failed", "image": None, "status": "read_error", "error": "FileNotFoundError: gone", "caption": "y"},
        {"key": "huge", "image": _photo("coffee"), "status": "ok", "caption": "z"},  # 600 x 400
    ]
    models = {
        "clip_scorer": ModelSpec(path=str(tiny["clip"])),
        "nsfw_head": ModelSpec(path=str(tiny["half"])),
        "watermark_head": ModelSpec(path=str(tiny["three"])),
    }
    table = score_shard(tmp_path, rows, models, max_pixels=100_000)
    assert table["status"].to_pylist() == ["ok", "ok", "decode_error", "empty_file", "read_error", "too_large"]
    assert table["error"].to_pylist()[4] == "FileNotFoundError: gone"  # the upstream reason, kept
    assert table["width"].to_pylist()[2] == 9
    np.testing.assert_allclose(_column(table, "nsfw")[:2], 0.5, atol=1e-7)
    np.testing.assert_allclose(_column(table, "watermark")[:2], 0.75, atol=1e-6)
    for name in ("clip_score", "nsfw", "watermark"):
        assert table[name].null_count == 4, name  # exactly the rows not scored
    assert table["aesthetic"].null_count == len(rows)  # no aesthetic head: null, not faked
    assert table["embedding"].null_count == len(rows)  # keep_embedding off


def test_positive_class_picks_the_class_a_two_logit_head_scores(tiny, tmp_path):
    models = {"clip_scorer": ModelSpec(path=str(tiny["clip"])), "watermark_head": ModelSpec(path=str(tiny["three"]))}
    table = score_shard(tmp_path, good_rows()[:2], models, positive_class={"watermark": 0})
    np.testing.assert_allclose(_column(table, "watermark"), 0.25, atol=1e-6)  # softmax([0, ln 3])[0]


def test_keep_from_skips_rows_the_keep_source_drops(tiny, tmp_path):
    rows = good_rows()
    keep = [True, False, True, False, True]
    table = score_shard(tmp_path, rows, all_heads(tiny), keep=keep, heads=["aesthetic"])
    assert table["status"].to_pylist() == ["ok", "skipped_duplicate", "ok", "skipped_duplicate", "ok"]
    aesthetic = _column(table, "aesthetic")
    assert not np.isnan(aesthetic[[0, 2, 4]]).any() and np.isnan(aesthetic[[1, 3]]).all()
    assert table["nsfw"].null_count == len(rows)  # `heads` picks aesthetic only, though nsfw_head is defined


def test_torchscript_head_with_activations(tiny, tmp_path):
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).eval()
    torch.jit.script(module).save(str(tmp_path / "head.pt"))
    rows = good_rows()[:3]
    models = {
        "clip_scorer": ModelSpec(path=str(tiny["clip"])),
        "aesthetic_head": ModelSpec(path=str(tmp_path / "head.pt")),
    }
    table = score_shard(tmp_path / "run", rows, models)
    embeddings, _ = direct_open_clip(f"local-dir:{tiny['clip']}", None, rows)
    with torch.no_grad():
        expected = module(torch.from_numpy(embeddings)).numpy()[:, 0]
    np.testing.assert_allclose(_column(table, "aesthetic"), expected, atol=2e-5)


# ----------------------------------------------------------------------------------------------------
# config checks, before any work


def _pipeline(models: dict, score: dict | None = None, tmp_path: Path | None = None) -> str:
    return yaml.safe_dump(
        {
            "name": "score-check",
            "output": str(tmp_path or "/tmp/x"),
            "models": models,
            "stages": [
                {"kind": "local", "name": "ingest", "path": str(tmp_path or "/tmp")},
                {"kind": "score", **(score or {})},
            ],
        }
    )


def _problems(text: str) -> str:
    with pytest.raises(ConfigError) as error:
        parse_pipeline(text, "p.yaml")
    return str(error.value)


def test_config_accepts_each_model_source(tiny, tmp_path):
    clip = {"path": str(tiny["clip"])}
    parse_pipeline(_pipeline({"clip_scorer": clip, "aesthetic_head": {"path": str(tiny["aesthetic"])}}, None, tmp_path))
    parse_pipeline(
        _pipeline({"clip_scorer": {"path": str(tiny["checkpoint"]), "architecture": str(tiny["config_json"])}})
    )
    # the documented default: open_clip's pretrained tag (nothing is downloaded by the check)
    parse_pipeline(_pipeline({"clip_scorer": {"id": "openai", "architecture": "ViT-L-14-quickgelu"}}))
    parse_pipeline(_pipeline({"clip_scorer": {"id": "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"}}))


@pytest.mark.parametrize(
    "models, score, expected",
    [
        ({"clip_scorer": "CHECKPOINT"}, None, "models.clip_scorer.architecture: required with a checkpoint file"),
        ({"clip_scorer": {"path": "CHECKPOINT", "architecture": "ViT-Q-99"}}, None, "not an open_clip model name"),
        (
            {"clip_scorer": {"id": "openai", "architecture": "ViT-L-14"}},
            None,
            "trained with QuickGELU; ViT-L-14 differs",
        ),
        ({"clip_scorer": {"id": "no-such-tag", "architecture": "ViT-B-32"}}, None, "is not a pretrained tag"),
        ({"clip_scorer": "FOLDER", "aesthetic_head": {"path": "WIDE"}}, None, "the head takes 768-d embeddings"),
        ({"clip_scorer": "FOLDER", "aesthetic_head": {"path": "THREE"}}, None, "an aesthetic head returns 1 value"),
        ({"clip_scorer": "FOLDER", "nsfw_head": {"path": "BN"}}, None, "heads with other layers than Linear"),
        ({"clip_scorer": "FOLDER", "nsfw_head": {"path": "JUNK"}}, None, "not a usable head"),
        ({"clip_scorer": "FOLDER"}, {"positive_class": {"nsfw": 2}}, "positive_class.nsfw"),
        ({"clip_scorer": "FOLDER"}, {"heads": ["nsfw"]}, "needs model 'nsfw_head'"),
        ({"clip_scorer": "FOLDER"}, {"keep_from": "ingest"}, "keep_from 'ingest' must also be listed in `join`"),
        ({"clip_scorer": {"id": "org/repo", "revision": "v1"}}, None, "give `architecture` to load a pinned revision"),
    ],
)
def test_config_errors_name_the_problem(tiny, tmp_path, models, score, expected):
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "wide.pth")
    torch.save({"layers.0.weight": torch.zeros(1, 64), "layers.1.running_mean": torch.zeros(1)}, tmp_path / "bn.pth")
    (tmp_path / "junk.pth").write_bytes(b"<html>not a head</html>")
    places = {
        "CHECKPOINT": str(tiny["checkpoint"]),
        "FOLDER": str(tiny["clip"]),
        "WIDE": str(tmp_path / "wide.pth"),
        "THREE": str(tiny["three"]),
        "BN": str(tmp_path / "bn.pth"),
        "JUNK": str(tmp_path / "junk.pth"),
    }

    def fill(value):
        if isinstance(value, str):
            return {"path": places[value]}
        return {k: places.get(v, v) if isinstance(v, str) else v for k, v in value.items()}

    message = _problems(_pipeline({role: fill(spec) for role, spec in models.items()}, score, tmp_path))
    assert expected in message
    assert "p.yaml:" in message


def test_architecture_is_refused_on_other_stages_models(tmp_path):
    text = yaml.safe_dump(
        {
            "name": "x",
            "output": str(tmp_path),
            "models": {"sscd": {"path": ONNX_SSCD, "architecture": "ViT-B-32"}},
            "stages": [{"kind": "local", "path": str(tmp_path)}, {"kind": "sscd"}],
        }
    )
    assert "models.sscd.architecture: stage 'sscd' (sscd) loads sscd from its own files" in _problems(text)


# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_score_through_the_runner_after_dedup(tiny, sample_images, tmp_path, ray_cluster):
    """local -> sscd -> dedup -> score (keep_from dedup) on the real runner: duplicates are never scored."""
    run = tmp_path / "run"
    pipeline = {
        "name": "score-test",
        "output": str(run),
        "models": {
            "sscd": {"path": ONNX_SSCD},
            "clip_scorer": {"path": str(tiny["clip"])},
            "aesthetic_head": {"path": str(tiny["aesthetic"])},
        },
        "stages": [
            {"kind": "local", "name": "ingest", "path": str(sample_images), "shard_size": 12},
            {"kind": "sscd", "resources": {"num_cpus": 1, "concurrency": 1, "batch_size": 16}},
            {"kind": "dedup", "resources": {"num_cpus": 1}},
            {
                "kind": "score",
                "input": "ingest",
                "join": ["dedup"],
                "keep_from": "dedup",
                "keep_embedding": True,
                "resources": {"num_cpus": 1, "concurrency": 1, "batch_size": 8},
            },
        ],
    }
    parsed = parse_pipeline(yaml.safe_dump(pipeline), "score-test.yaml", base_dir=tmp_path)
    records = run_pipeline(parsed, log=lambda line: None)
    tables = {
        s: pa.concat_tables(pq.read_table(f) for f in sorted((run / s).glob("shard-*.parquet")))
        for s in ("ingest", "dedup", "score")
    }
    ingest, dedup, score = tables["ingest"], tables["dedup"], tables["score"]
    assert score["key"].to_pylist() == ingest["key"].to_pylist()  # 1:1 lineage, same order
    assert records["score"]["rows"] == ingest.num_rows
    keep = dict(zip(dedup["key"].to_pylist(), dedup["keep"].to_pylist(), strict=True))
    for row, up in zip(score.to_pylist(), ingest.to_pylist(), strict=True):
        if up["status"] != "ok":
            assert row["status"] == up["status"] and row["aesthetic"] is None
        elif not keep[row["key"]]:
            assert row["status"] == "skipped_duplicate" and row["aesthetic"] is None and row["embedding"] is None
        else:
            assert row["status"] == "ok" and row["aesthetic"] is not None and len(row["embedding"]) == 64
            assert (row["clip_score"] is None) == (up["caption"] is None or not up["caption"].strip())
    assert "skipped_duplicate" in records["score"]["status"]  # the sample set has duplicates
    ok = [i for i, s in enumerate(score["status"].to_pylist()) if s == "ok" and ingest["caption"][i].as_py()]
    _, clip = direct_open_clip(f"local-dir:{tiny['clip']}", None, [ingest.slice(i, 1).to_pylist()[0] for i in ok[:3]])
    np.testing.assert_allclose(_column(score, "clip_score")[ok[:3]], clip, atol=2e-5)

    # A quality filter on the stored scores; new thresholds re-run the filter only (--redo), never the model.
    scores = [a for a, s in zip(_column(score, "aesthetic"), score["status"].to_pylist(), strict=True) if s == "ok"]
    cut = float(np.median(scores))

    def with_filter(aesthetic_min: float):
        quality = {"kind": "filter", "name": "quality", "input": "ingest", "join": ["dedup", "score"]}
        quality.update(keep_from="dedup", score_from="score", aesthetic_min=aesthetic_min)
        return parse_pipeline(
            yaml.safe_dump({**pipeline, "stages": [*pipeline["stages"], quality]}), "score-test.yaml", base_dir=tmp_path
        )

    def snapshot() -> dict[str, tuple[int, bytes]]:
        return {
            str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((run / "score").rglob("*")) if p.is_file()
        }

    def kept() -> dict[str, bool]:
        table = pa.concat_tables(pq.read_table(f) for f in sorted((run / "quality").glob("shard-*.parquet")))
        return dict(zip(table["key"].to_pylist(), table["keep"].to_pylist(), strict=True))

    before = snapshot()
    run_pipeline(with_filter(cut), log=lambda line: None)
    aesthetic = dict(zip(score["key"].to_pylist(), _column(score, "aesthetic"), strict=True))
    status = dict(zip(score["key"].to_pylist(), score["status"].to_pylist(), strict=True))
    assert kept() == {k: status[k] == "ok" and float(aesthetic[k]) >= cut for k in status}
    lines: list[str] = []
    lower = max(0.0, float(np.min(scores)))
    run_pipeline(with_filter(lower), redo=["quality"], log=lines.append)
    assert kept() == {k: status[k] == "ok" and float(aesthetic[k]) >= lower for k in status}
    assert sum(kept().values()) > sum(1 for k in status if status[k] == "ok" and float(aesthetic[k]) >= cut)
    assert snapshot() == before  # no score shard, marker or record rewritten
    assert not any(line.startswith("[score]") and "rows/s" in line for line in lines)
