"""Every vision-language family the caption stage supports, each as a tiny random-weight model of its real
architecture saved in its real on-disk format, driven with the stage settings configs/captioners.yaml
documents for it, through the stage's own loading path (`setup`) and shard function (`process`):

- `curate check`'s model checks pass, and the stage captions an image shard;
- batched captions equal one-by-one captions (images of mixed sizes, so padded batches);
- an image that does not decode and an over-long input each get their row status; the shard completes;
- the raw text holds only new tokens, never the prompt.

And configs that cannot be driven (an unknown architecture, no chat template and no task prompt, a prompt
that places no image, too many new tokens) fail at `curate check`, naming the field. Each family's model is
built once for the module; the stage runs in this process (the Ray path is tested in test_caption.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image

from curate import storage
from curate.cli import main as curate_main
from curate.config import ConfigError, Resources
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir, ShardTask
from curate.runner import StageJob, execute_shard, prepare_stage
from curate.stages import STAGES
from curate.stages.caption import process
from curate.stages.spec import WorkContext
from curate.testing.tiny_vlms import build_tiny_vlms

REPO = Path(__file__).resolve().parents[1]
ENTRIES = {k: v for k, v in yaml.safe_load((REPO / "configs" / "captioners.yaml").read_text()).items() if k != "dense"}
MAX_NEW_TOKENS = 8
# families whose image always gives the same number of tokens (fixed resolution, no tiling): an input can
# only be over-long for every row at once
FIXED_TOKENS = {"gemma3", "blip-2", "paligemma", "florence2"}
# images of mixed sizes and aspects, one larger (tiling and dynamic-resolution families give it more tokens)
SIZES = [(64, 48), (120, 90), (40, 100), (200, 60), (80, 80), (700, 500)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_vlms(tmp_path_factory.mktemp("vlms"))


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """One image shard written by the `local` stage, then one row's bytes replaced by bytes of no image format
    (its upstream status left ok, as from a source that did not check its bytes)."""
    root = tmp_path_factory.mktemp("family-shard")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([*SIZES, (90, 70)]):  # random 3x3 colour fields: each image clearly its own
        cells = Image.fromarray(rng.integers(0, 255, (3, 3, 3), np.uint8))
        cells.resize((w, h), Image.Resampling.BILINEAR).save(images / f"img-{i}.jpg", quality=90)
    pipeline = parse_pipeline(
        f"name: s\noutput: {root / 'run'}\nstages:\n  - {{kind: local, name: ingest, path: {images}}}\n"
    )
    run = RunDir(str(root / "run"))
    _, tasks = prepare_stage(pipeline, run, pipeline.stage("ingest"))
    job = StageJob("local", pipeline.stage("ingest"), WorkContext(run.uri, "ingest", None))
    assert execute_shard(job, tasks[0], None)["ok"]
    path = run.stage("ingest").shard(0)
    table = storage.read_parquet(path)
    broken = next(i for i, url in enumerate(table["url"].to_pylist()) if url.endswith("img-6.jpg"))
    image = table["image"].to_pylist()
    image[broken] = b"\x89PNG but not really " * 8
    status = table["status"].to_pylist()
    status[broken] = "ok"
    for name, values in (("image", pa.array(image, pa.binary())), ("status", pa.array(status, pa.string()))):
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), values)
    storage.write_parquet_atomic(path, table)
    return root / "run"


def pipeline_text(model: Path, caption: dict, extra: dict | None = None, run: Path | None = None) -> str:
    stage = {"kind": "caption", "input": "ingest", **caption, "max_new_tokens": MAX_NEW_TOKENS, **(extra or {})}
    stage["resources"] = {"batch_size": 4}
    data = {
        "name": "family",
        "output": str(run or model.parent / "run"),
        "models": {"captioner": {"path": str(model)}},
        "stages": [{"kind": "local", "name": "ingest", "path": str(model)}, stage],
    }
    return yaml.safe_dump(data, sort_keys=False)


def caption(config, run: Path, models, captioner=None, batch_size: int = 4):
    """The stage's setup (unless a captioner is given) and process on image shard 0: (rows by key, marker counters)."""
    context = WorkContext(str(run), "caption", RunDir(str(run)).stage("ingest").uri, models)
    captioner = captioner or STAGES["caption"].setup(config, context)
    config = config.model_copy(update={"resources": Resources(batch_size=batch_size)})
    output = process(config, ShardTask(0, (context.upstream_shard(0),)), context, captioner)
    return {r["key"]: r for r in output.table.to_pylist()}, output.extra, captioner


def shard_images(run: Path) -> dict[str, Image.Image]:
    table = storage.read_parquet(RunDir(str(run)).stage("ingest").shard(0), columns=["key", "image"])
    out = {}
    for key, data in zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True):
        with contextlib.suppress(OSError):  # the broken row
            out[key] = Image.open(io.BytesIO(data)).convert("RGB")
    return out


@pytest.mark.parametrize("family", list(ENTRIES))
def test_family_captions_a_shard(family, tiny, shard):
    entry = ENTRIES[family]
    model = tiny[family]
    assert json.loads((model / "config.json").read_text())["model_type"] == family  # the real architecture
    pipeline = parse_pipeline(pipeline_text(model, entry["caption"]))  # curate check's model checks pass
    config = pipeline.stage("caption")

    batched, extra, captioner = caption(config, shard, pipeline.models)
    single, _, _ = caption(config, shard, pipeline.models, captioner, batch_size=1)
    assert type(captioner.model).__name__.lower().replace("_", "").startswith(family.replace("_", "").replace("-", ""))

    # every row has a status: the broken image is that row's `decode_error` (the stage's own decoding), the
    # model wrote text for the rest (random weights may write only what cleaning removes: `empty_caption`)
    statuses = {k: r["status"] for k, r in batched.items()}
    assert list(statuses.values()).count("decode_error") == 1, statuses
    ok = {k: r for k, r in batched.items() if r["status"] != "decode_error"}
    assert all(r["status"] in ("ok", "empty_caption") and r["caption_raw"] is not None for r in ok.values()), ok
    assert extra["fed_to_model"] == len(ok) and extra["captioned"] == list(statuses.values()).count("ok") > 0
    assert all(r["prompt"] == config.prompt_column and r["captioner"] == str(model) for r in batched.values())

    # batched (padded, images of mixed sizes) equals one by one
    for key, row in batched.items():
        for column in ("status", "caption_raw", "caption_synthetic", "tokens_generated", "truncated"):
            assert row[column] == single[key][column], (family, key, column, row, single[key])
    # the model sees the image: not every caption is the same
    assert len({r["caption_raw"] for r in ok.values()}) > 1, ok

    # the stage's text is the processor's own reference: apply_chat_template(tokenize=True) (or the task prompt
    # through the processor) + generate with the model's generation config, one image at a time (the largest and
    # the smallest image: a doubled BOS or a wrong special token changes random weights' text on any image)
    images = shard_images(shard)
    by_area = sorted(images, key=lambda k: images[k].width * images[k].height)
    for key in (by_area[0], by_area[-1]):
        image = images[key]
        expected, truncated = reference_caption(captioner, entry["caption"], image)
        assert batched[key]["caption_raw"] == expected, (family, key, batched[key]["caption_raw"], expected)
        assert batched[key]["truncated"] == truncated, (family, key)

    # only new tokens are decoded: no prompt echo (the prompt's text as the model saw it, after the processor
    # expanded task tokens), never more than max_new_tokens
    inputs = captioner.prepare([next(iter(images.values()))])
    seen = captioner.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True).split()
    assert seen, "the prompt the model saw has text"
    for row in ok.values():
        assert 0 <= row["tokens_generated"] <= MAX_NEW_TOKENS
        assert " ".join(seen[-3:]) not in row["caption_raw"], (seen, row["caption_raw"])

    # over-long input: a limit just under the longest image's prompt + image tokens; rows over it get too_long
    lengths = {k: captioner.input_lengths(captioner.prepare([im]))[0] for k, im in images.items()}
    limit = max(lengths.values()) - 1
    over = {k for k, n in lengths.items() if n > limit}
    if family in FIXED_TOKENS:
        assert over == set(lengths)
    else:  # the image's size decides its tokens: some rows are over, not all
        assert 0 < len(over) < len(lengths), lengths
    limited = config.model_copy(update={"max_input_tokens": limit})
    rows, extra, _ = caption(limited, shard, pipeline.models)
    assert {k for k, r in rows.items() if r["status"] == "too_long"} == over
    assert all(str(limit) in rows[k]["error"] and rows[k]["caption_raw"] is None for k in over)
    assert extra["too_long"] == len(over) and extra["fed_to_model"] == len(ok) - len(over)
    for key in set(ok) - over:  # the others are captioned exactly as before
        assert rows[key]["caption_raw"] == batched[key]["caption_raw"]


def reference_caption(captioner, caption_fields: dict, image: Image.Image) -> tuple[str, bool]:
    """What the family's processor and model give for one image the way their model cards call them: the chat
    template applied with `tokenize=True` (or the task prompt through the processor), `generate` with the model's
    own generation config, the new tokens decoded. Truncated: the token budget ran out, with no end token or only
    the one the generation config forces at the last step."""
    processor, model = captioner.processor, captioner.model
    if "task_prompt" in caption_fields:
        inputs = processor(text=caption_fields["task_prompt"], images=image, return_tensors="pt")
    else:
        content = [{"type": "image", "image": image}, {"type": "text", "text": caption_fields["prompt"]}]
        messages = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    inputs.pop("labels", None)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    new = out[0, 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    end = next((i for i, t in enumerate(new) if t in eos), None)
    forced = getattr(model.generation_config, "forced_eos_token_id", None) is not None
    used = len(new) if end is None else end + 1
    truncated = used == MAX_NEW_TOKENS and (end is None or forced)
    return processor.decode(new if end is None else new[:end], skip_special_tokens=True), truncated


def test_bos_is_written_once_and_forced_end_tokens_count_as_truncated(tiny):
    """The families whose tokenizer adds BOS and whose template writes it (Gemma 3, LLaVA-NeXT's Mistral) get one
    BOS, as apply_chat_template(tokenize=True) gives; Florence-2's forced end token marks a caption that ran out."""
    from curate.caption.vlm import Captioner, GenerationOptions, LoadOptions
    from curate.config import ModelSpec

    image = Image.new("RGB", (64, 48), (120, 40, 200))
    for family in ("gemma3", "llava_next"):
        captioner = Captioner(ModelSpec(path=str(tiny[family])), LoadOptions(), GenerationOptions(prompt="Describe."))
        tokenizer = captioner.tokenizer
        assert tokenizer("a cat")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS
        assert captioner.text_prompt.startswith(tokenizer.bos_token)  # and the template writes it
        ids = captioner.prepare([image])["input_ids"][0].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, (family, ids[:4])
    options = GenerationOptions(prompt="", task_prompt="<MORE_DETAILED_CAPTION>", max_new_tokens=3)
    florence = Captioner(ModelSpec(path=str(tiny["florence2"])), LoadOptions(), options)
    assert florence.model.generation_config.forced_eos_token_id == florence.tokenizer.eos_token_id
    generated = florence.generate(florence.prepare([image]))[0]
    # three new tokens: two of the model's and the forced end token, which is not the model's choice
    assert generated.tokens == 2 and generated.truncated


# ----------------------------------------------------------------------------------------------------
# what `curate check` refuses


def copy_without_weights(model: Path, target: Path) -> Path:
    """The model's config and processor files only: the check reads nothing else."""
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def check_fails(tmp_path: Path, model: Path, caption: dict, *expected: str, extra: dict | None = None) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text(model, caption, extra, run=tmp_path / "run"))
    with pytest.raises(ConfigError) as error:
        parse_pipeline(path.read_text(), str(path))
    message = str(error.value)
    for text in expected:
        assert text in message, message
    return message


def test_check_refuses_an_architecture_transformers_does_not_know(tiny, tmp_path, capsys):
    model = copy_without_weights(tiny["qwen2_vl"], tmp_path / "unknown")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"model_type": "no_such_vlm"}))
    check_fails(tmp_path, model, {}, "stages[1]: models.captioner: model_type 'no_such_vlm'", "trust_remote_code")
    # trust_remote_code without code of its own in the config
    check_fails(tmp_path, model, {"trust_remote_code": True}, "maps no code of its own (no auto_map)")
    # the command itself: exit 2, the problem on stderr, before any work
    (tmp_path / "p.yaml").write_text(pipeline_text(model, {}, run=tmp_path / "run"))
    assert curate_main(["check", str(tmp_path / "p.yaml")]) == 2
    assert "models.captioner: model_type 'no_such_vlm'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_check_refuses_a_model_without_chat_template_or_task_prompt(tiny, tmp_path):
    model = copy_without_weights(tiny["qwen2_vl"], tmp_path / "no-template")
    (model / "chat_template.jinja").unlink()
    check_fails(tmp_path, model, {}, "stages[1].task_prompt: models.captioner: the model has no chat template")
    # Florence-2 has none either: its processor's task tokens are named in the message
    check_fails(tmp_path, tiny["florence2"], {}, "stages[1].task_prompt", "<MORE_DETAILED_CAPTION>")


def test_check_refuses_prompts_that_cannot_be_driven(tiny, tmp_path):
    # a task prompt that places no image where the processor expects the model's image token
    check_fails(tmp_path, tiny["llava_next"], {"task_prompt": "[INST] Describe. [/INST]"}, "stages[1].task_prompt")
    # more new tokens than BLIP-2's (tiny) OPT context
    check_fails(
        tmp_path,
        tiny["blip-2"],
        {"task_prompt": "Question: what? Answer:"},
        "stages[1].max_new_tokens",
        extra={"max_new_tokens": 600},
    )


def test_check_reads_hub_models_from_the_local_cache_only():
    """A hub id not in the local Hugging Face cache is left to the worker that loads it: no problem reported,
    nothing fetched (the check runs where no network is assumed)."""
    from curate.caption.preflight import drivable_problems
    from curate.caption.vlm import GenerationOptions, LoadOptions
    from curate.config import ModelSpec

    spec = ModelSpec(id="curate-tests/not-a-cached-model")
    assert drivable_problems(spec, LoadOptions(), GenerationOptions(prompt="Describe."), 1024) == []


def test_task_prompt_is_for_the_transformers_backend(tiny, tmp_path):
    endpoint = {"backend": "openai", "endpoints": ["http://127.0.0.1:9/v1"], "client": {"model": "m"}}
    check_fails(tmp_path, tiny["florence2"], {"task_prompt": "<CAPTION>", **endpoint}, "task_prompt and max_input")
