"""The caption stage: a real (tiny, random-weight) Qwen2-VL loaded by path captions every kept row or
gives it a status, batches equal one-by-one results, dropped duplicates never reach the model, a bad
image fails alone, and a resumed run redoes only missing shards."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from curate import storage
from curate.caption.text import clean_caption, drop_cut_off_sentence, normalize_whitespace, strip_stock_prefix
from curate.caption.vlm import is_out_of_memory
from curate.config import ConfigError
from curate.inspect import read_stage
from curate.keep import NOT_OK_UPSTREAM, SKIPPED_DUPLICATE, select_rows
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir, ShardStats
from curate.runner import StageJob, execute_shard, prepare_stage, run_pipeline
from curate.schema import parquet_options
from curate.stages import STAGES
from curate.stages.caption import CAPTION_SCHEMA
from curate.stages.spec import WorkContext
from curate.testing.openai_server import CompletionServer
from curate.testing.tiny_vlm import build_tiny_qwen2_vl

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


def pipeline_text(out: Path, images: Path, model: Path, *, batch_size: int = 4, keep: bool = False, extra: str = ""):
    """The pipeline under test. With ``keep``, a stage named `dedup` is declared for the caption stage to
    join: the dedup stage kind is built on another branch, so the test never runs it and writes its output
    (`write_keep_stage`) the way that stage does; the caption stage only reads its shards."""
    join = "    join: [dedup]\n    keep_from: dedup\n" if keep else ""
    dedup = f"  - kind: local\n    name: dedup\n    path: {images}\n" if keep else ""
    return f"""\
name: caption-test
output: {out}
models:
  captioner: {{path: {model}}}
stages:
  - kind: local
    name: ingest
    path: {images}
    shard_size: 5
{dedup}  - kind: caption
    input: ingest
{join}    max_new_tokens: {MAX_NEW_TOKENS}
    decode_threads: 2
{extra}    resources: {{num_cpus: 1, batch_size: {batch_size}, concurrency: 1}}
"""


def run_stage_here(pipeline, name: str) -> None:
    """Run every shard of a stage in this process through the runner's own shard function (no Ray): the
    same plan, shard files and markers as `curate run`, with the model loaded once by the stage's setup."""
    stage = pipeline.stage(name)
    run = RunDir(storage.absolute(pipeline.output))
    _, tasks = prepare_stage(pipeline, run, stage)
    upstream = pipeline.upstream(stage)
    joined = {j: run.stage(j).uri for j in stage.join}
    context = WorkContext(
        run.uri, name, run.stage(upstream.stage_name).uri if upstream else None, pipeline.models, joined
    )
    spec = STAGES[stage.kind]
    state = spec.setup(stage, context) if spec.setup else None
    for task in tasks:
        result = execute_shard(StageJob(stage.kind, stage, context), task, state)
        assert result["ok"], result["error"]


def write_keep_stage(run: Path, drop_every: int = 3) -> set[str]:
    """A keep table as the dedup stage writes it (1:1 with the image shards, `key` + `keep`, markers and a
    completion record); every `drop_every`-th ok image is marked a duplicate. Returns the dropped keys."""
    ingest = RunDir(str(run)).stage("ingest")
    dedup = RunDir(str(run)).stage("dedup")
    dropped: set[str] = set()
    position = 0
    for index in sorted(ingest.done_shards()):
        images = storage.read_parquet(ingest.shard(index), columns=["key", "status"])
        keep = []
        for key, status in zip(images["key"].to_pylist(), images["status"].to_pylist(), strict=True):
            position += status == "ok"
            drop = status == "ok" and position % drop_every == 0
            keep.append(not drop)
            if drop:
                dropped.add(key)
        table = pa.table(
            {
                "key": images["key"],
                "cluster": pa.array(range(len(keep)), pa.int64()),
                "keep": pa.array(keep, pa.bool_()),
                "dup_of": pa.array([None] * len(keep), pa.string()),
                "similarity": pa.array([None] * len(keep), pa.float32()),
            }
        )
        size = storage.write_parquet_atomic(dedup.shard(index), table, **parquet_options(table))
        dedup.write_marker(ShardStats(index, table.num_rows, {"ok": table.num_rows}, 0.0, size))
    storage.write_json(dedup.success_uri, {"stage": "dedup", "kind": "dedup"})
    return dropped


def shard_tables(run: Path, stage: str) -> list[pa.Table]:
    folder = RunDir(str(run)).stage(stage)
    return [storage.read_parquet(u) for u in folder.shard_uris()]


def markers(run: Path, stage: str) -> list[dict]:
    return [s.extra | {"shard": s.shard} for s in RunDir(str(run)).stage(stage).shard_stats()]


# ----------------------------------------------------------------------------------------------------
# end to end on Ray


def test_pipeline_captions_kept_rows_skips_duplicates_and_resumes(ray_cluster, sample_images, tiny_vlm, tmp_path):
    run = tmp_path / "run"
    pipeline = parse_pipeline(pipeline_text(run, sample_images, tiny_vlm, keep=True))
    run_pipeline(pipeline, only=["ingest"], log=lambda line: None)
    dropped = write_keep_stage(run)
    assert dropped
    records = run_pipeline(pipeline, only=["caption"], log=lambda line: None)

    ingest, captions = shard_tables(run, "ingest"), shard_tables(run, "caption")
    assert len(ingest) == len(captions) > 1
    for images, caption in zip(ingest, captions, strict=True):  # 1:1 lineage, same keys in the same order
        assert caption.schema.equals(CAPTION_SCHEMA, check_metadata=False)
        assert caption["key"].to_pylist() == images["key"].to_pylist()
    images = pa.concat_tables(ingest).to_pylist()
    rows = {r["key"]: r for r in pa.concat_tables(captions).to_pylist()}
    kept_ok = [r["key"] for r in images if r["status"] == "ok" and r["key"] not in dropped]
    for image in images:
        row = rows[image["key"]]
        assert row["captioner"] == str(tiny_vlm) and row["prompt"]
        if image["status"] != "ok":
            assert row["status"] == NOT_OK_UPSTREAM and image["status"] in row["error"]
        elif image["key"] in dropped:
            assert row["status"] == SKIPPED_DUPLICATE and row["caption_synthetic"] is None
            assert row["tokens_generated"] is None
        else:
            assert row["status"] == "ok", row
            assert row["caption_synthetic"] and row["caption_raw"]
            assert 0 < row["tokens_generated"] <= MAX_NEW_TOKENS
    # duplicates were never fed to the model: the shard counters count exactly the kept ok images
    stats = markers(run, "caption")
    assert sum(s["fed_to_model"] for s in stats) == len(kept_ok)
    assert records["caption"]["status"] == {
        "ok": len(kept_ok),
        SKIPPED_DUPLICATE: len(dropped),
        NOT_OK_UPSTREAM: sum(r["status"] != "ok" for r in images),
    }

    # Resume: lose one shard's marker and file and the stage record; only that shard is captioned again.
    stage = run / "caption"
    lost = 1
    (stage / "_SUCCESS.json").unlink()
    (stage / "_shards" / f"shard-{lost:05d}.json").unlink()
    others = [p for p in stage.glob("shard-*.parquet") if p.name != f"shard-{lost:05d}.parquet"]
    others += list((stage / "_shards").iterdir())
    before = {p: p.stat().st_mtime_ns for p in others}
    expected = captions[lost]
    (stage / f"shard-{lost:05d}.parquet").unlink()
    logs: list[str] = []
    run_pipeline(pipeline, only=["caption"], log=logs.append)
    assert any("resuming" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in others} == before  # finished shards untouched
    assert markers(run, "caption")[lost]["fed_to_model"] > 0  # the lost shard was captioned again
    redone = storage.read_parquet(str(stage / f"shard-{lost:05d}.parquet"))
    assert redone.select(CAPTION_SCHEMA.names).equals(expected.select(CAPTION_SCHEMA.names))
    assert (stage / "_SUCCESS.json").exists()


# ----------------------------------------------------------------------------------------------------
# in-process (the runner's shard function, no Ray): batching, failures


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, sample_images) -> Path:
    """Sample images plus one the model's processor refuses (aspect ratio above Qwen2-VL's limit of 200)."""
    folder = tmp_path_factory.mktemp("odd")
    for name in sorted(os.listdir(sample_images)):
        if name.endswith((".jpg", ".png", ".webp")):
            (folder / name).write_bytes((sample_images / name).read_bytes())
    Image.new("RGB", (600, 2), (200, 30, 30)).save(folder / "m-sliver.png")
    return folder


def caption_run(
    tmp_path: Path, images: Path, model: Path, batch_size: int, extra: str = "", name: str | None = None
) -> dict[str, dict]:
    out = tmp_path / (name or f"b{batch_size}")
    pipeline = parse_pipeline(pipeline_text(out, images, model, batch_size=batch_size, extra=extra))
    run_stage_here(pipeline, "ingest")
    run_stage_here(pipeline, "caption")
    table = read_stage(pipeline.output, "caption")
    return {r["key"]: r for r in table.to_pylist()}


def test_batched_equals_one_by_one_and_a_bad_image_fails_alone(odd_images, tiny_vlm, tmp_path):
    single = caption_run(tmp_path, odd_images, tiny_vlm, batch_size=1)
    batched = caption_run(tmp_path, odd_images, tiny_vlm, batch_size=4)
    assert single.keys() == batched.keys()
    for key, row in single.items():
        other = batched[key]
        for column in ("caption_synthetic", "caption_raw", "tokens_generated", "truncated", "status"):
            assert row[column] == other[column], (column, row, other)
    ok = [r for r in batched.values() if r["status"] == "ok"]
    # padding is exercised: captions of different lengths share batches (some stop early, some run out)
    assert len({r["tokens_generated"] for r in ok}) > 2
    assert any(r["truncated"] for r in ok) and any(not r["truncated"] for r in ok)
    assert all(r["tokens_generated"] < MAX_NEW_TOKENS for r in ok if not r["truncated"])

    failed = [r for r in batched.values() if r["status"] == "caption_error"]
    assert len(failed) == 1 and "aspect ratio" in failed[0]["error"]
    assert failed[0]["caption_synthetic"] is None
    stats = markers(tmp_path / "b4", "caption")
    assert sum(s["batches_retried"] for s in stats) == 1  # the batch with the sliver went by halves
    upstream_bad = sum(r["status"] == NOT_OK_UPSTREAM for r in batched.values())
    assert upstream_bad == 3  # the samples' empty, truncated and not-an-image files
    assert sum(s["captioned"] for s in stats) == len(ok) == len(batched) - 1 - upstream_bad


def test_decode_limit_and_uncleaned_text(odd_images, tiny_vlm, tmp_path):
    """An image ok upstream but over this stage's pixel limit gets the decoder's status; clean: false keeps
    the generated text exactly (caption_synthetic == caption_raw)."""
    rows = caption_run(tmp_path, odd_images, tiny_vlm, batch_size=3, extra="    clean: false\n    max_pixels: 200000\n")
    too_large = [r for r in rows.values() if r["status"] == "too_large"]
    assert too_large and all(r["error"] and r["caption_synthetic"] is None for r in too_large)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok and all(r["caption_synthetic"] == r["caption_raw"] for r in ok)


def test_sampling_is_reproducible_with_its_seed(sample_images, tiny_vlm, tmp_path):
    """do_sample with temperature/top_p: captions differ from greedy ones, and a re-run with the same
    seed (and batch size) gives the same captions."""
    sampling = "    do_sample: true\n    temperature: 1.5\n    top_p: 0.95\n    seed: 7\n"
    first = caption_run(tmp_path, sample_images, tiny_vlm, batch_size=4, extra=sampling, name="s1")
    again = caption_run(tmp_path, sample_images, tiny_vlm, batch_size=4, extra=sampling, name="s2")
    greedy = caption_run(tmp_path, sample_images, tiny_vlm, batch_size=4, name="greedy")
    ok = [k for k, r in first.items() if r["status"] == "ok"]
    assert ok and all(first[k]["caption_raw"] == again[k]["caption_raw"] for k in ok)
    assert sum(first[k]["caption_raw"] != greedy[k]["caption_raw"] for k in ok) > len(ok) // 2


def test_openai_backend_against_a_server_on_localhost(odd_images, tiny_vlm, tmp_path):
    """The OpenAI backend against a real OpenAI-compatible server (on 127.0.0.1, serving the same tiny model):
    same captions as the in-process backend, 503s retried, the processor's 400 becomes that row's status."""
    reference = caption_run(tmp_path, odd_images, tiny_vlm, batch_size=4)
    with CompletionServer(str(tiny_vlm), unavailable_first=2) as server:
        endpoint = (
            f"    backend: openai\n    endpoints: ['{server.base_url}']\n"
            "    client: {model: tiny-vlm, image_format: png, max_in_flight: 3, retries: 4, backoff_s: 0.05}\n"
        )
        rows = caption_run(tmp_path, odd_images, tiny_vlm, batch_size=4, extra=endpoint, name="http")
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        expected = reference[key]
        if expected["status"] == "caption_error":  # the sliver: refused by the server's processor
            assert row["status"] == "http_error" and "HTTP 400" in row["error"] and "aspect ratio" in row["error"]
            continue
        assert row["captioner"] == "tiny-vlm via openai"
        for column in ("status", "caption_synthetic", "caption_raw", "tokens_generated", "truncated"):
            assert row[column] == expected[column], (column, row, expected)
    stats = markers(tmp_path / "http", "caption")
    fed = sum(s["fed_to_model"] for s in stats)
    assert server.requests == fed + 2  # every image once, plus the two answered 503 and sent again
    assert sum(s["pushed_back"] for s in stats) == 2 and sum(s["retries"] for s in stats) == 0


def test_openai_backend_gives_up_with_a_status(odd_images, tiny_vlm, tmp_path):
    """A server that fails every request (500): each row gets http_error after its retries; the shard completes."""
    with CompletionServer(str(tiny_vlm), error_first=10_000) as server:
        endpoint = (
            f"    backend: openai\n    endpoints: ['{server.base_url}']\n"
            "    client: {model: tiny-vlm, retries: 1, backoff_s: 0.01}\n"
        )
        rows = caption_run(tmp_path, odd_images, tiny_vlm, batch_size=8, extra=endpoint, name="down")
    failed = [r for r in rows.values() if r["status"] == "http_error"]
    assert failed and all("2 attempts failed" in r["error"] and "HTTP 500" in r["error"] for r in failed)
    assert len(failed) + sum(r["status"] == NOT_OK_UPSTREAM for r in rows.values()) == len(rows)
    assert server.requests == 2 * len(failed)


# ----------------------------------------------------------------------------------------------------
# units


def test_openai_backend_needs_servers_or_endpoints(tmp_path, sample_images, tiny_vlm):
    with pytest.raises(ConfigError, match="backend openai needs `servers`"):
        parse_pipeline(pipeline_text(tmp_path, sample_images, tiny_vlm, extra="    backend: openai\n"))
    extra = "    backend: openai\n    endpoints: ['http://127.0.0.1:9/v1']\n"
    with pytest.raises(ConfigError, match=r"client\.model: the served model name is needed"):
        parse_pipeline(pipeline_text(tmp_path, sample_images, tiny_vlm, extra=extra))
    with pytest.raises(ConfigError, match="client: only used with backend: openai"):
        parse_pipeline(pipeline_text(tmp_path, sample_images, tiny_vlm, extra="    client: {model: m}\n"))


def test_keep_from_must_be_joined(tmp_path, sample_images, tiny_vlm):
    text = pipeline_text(tmp_path, sample_images, tiny_vlm, extra="    keep_from: ingest\n")
    with pytest.raises(ConfigError, match="keep_from 'ingest' must also be listed in `join`"):
        parse_pipeline(text)


def test_keep_rule():
    upstream = pa.table({"key": ["a", "b", "c", "d"], "status": ["ok", "ok", "decode_error", "ok"]})
    selection = select_rows(upstream, {"a": True, "b": False, "c": True, "d": True})
    assert selection.process == [0, 3]
    assert [s and s[0] for s in selection.skip] == [None, SKIPPED_DUPLICATE, NOT_OK_UPSTREAM, None]
    assert select_rows(upstream, None).process == [0, 1, 3]
    with pytest.raises(ValueError, match="missing from the keep source"):
        select_rows(upstream, {"a": True})


@pytest.mark.parametrize(
    ("raw", "truncated", "clean"),
    [
        ("The image shows a cat on a mat.", False, "A cat on a mat."),
        ("  The image depicts  a red\n\nrocket on a pad. ", False, "A red rocket on a pad."),
        ("In this image, we can see two dogs running.", False, "Two dogs running."),
        ("This is an image of a lighthouse at dusk.", False, "A lighthouse at dusk."),
        ("The image is a photograph of old coins.", False, "A photograph of old coins."),
        ("The image is blurry and dark.", False, "The image is blurry and dark."),
        ("A photo of a cat.", False, "A photo of a cat."),
        ('**Caption:** "A bird on a wire."', False, "A bird on a wire."),
        ("Sure! Here is a detailed description of the image: The image shows a barn.", False, "A barn."),
        ("Certainly. Here's a caption: a red kite over a beach.", False, "A red kite over a beach."),
        ("Sure enough, the dog waits.", False, "Sure enough, the dog waits."),
        ("A cat sleeps on a sofa. Its tail hangs over the", True, "A cat sleeps on a sofa."),
        ("A cat sleeps on a sofa. Its tail hangs over the", False, "A cat sleeps on a sofa. Its tail hangs over the"),
        ("A cat sleeping on a sofa with its tail", True, "A cat sleeping on a sofa with its tail"),
        ("A coffee cup\x00 on\ufffd a saucer.", False, "A coffee cup on a saucer."),
    ],
)
def test_clean_caption(raw, truncated, clean):
    assert clean_caption(raw, truncated) == clean


def test_cleaning_steps_alone():
    assert normalize_whitespace(" a\t b\n\nc ") == "a b c"
    assert strip_stock_prefix("The picture shows: a tree") == "A tree"
    assert strip_stock_prefix("The image") == "The image"
    assert drop_cut_off_sentence('He said "stop." Then he') == 'He said "stop."'


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"))
    assert not is_out_of_memory(ValueError("absolute aspect ratio must be smaller than 200"))
