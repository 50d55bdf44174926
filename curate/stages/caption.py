"""`caption`: synthetic captions from a vision-language model, one row per image row, beside the originals.

SD3 trained on 50% original and 50% synthetic (CogVLM) captions; this stage writes the synthetic ones.
It reads an image shard (its `input`) and, with `keep_from`, the keep flags of a joined stage (dedup):
only rows that are `ok` upstream and kept are fed to the model (rule in `curate.keep`). With the transformers
backend the model is loaded once per actor (`setup`) and fed in batches (`curate.caption.batches`).

With `backend: openai` the model runs on inference servers (vLLM, SGLang): the stage starts them for its whole
run (`servers`) or uses the user's (`endpoints`), checks they serve the model before any row is sent
(`services`), and each worker streams its shard's images to all of them (`curate.caption.stream`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pyarrow as pa
from PIL import Image
from pydantic import Field, PositiveInt, model_validator

from curate import storage
from curate.caption.batches import Item, Outcome, by_size, decode, outcome_of, prepared_batches, run_batch
from curate.caption.client import ClientConfig
from curate.caption.drive import model_pixel_budget
from curate.caption.servers import ServersConfig, serving
from curate.caption.stream import Failure, StreamCaptioner
from curate.caption.text import clean_caption
from curate.caption.vlm import Captioner, GenerationOptions, LoadOptions
from curate.config import ModelSpec, StageConfig
from curate.images import DEFAULT_MAX_PIXELS
from curate.keep import check_keep_from, keep_table_for, select_rows
from curate.runfolder import ShardTask
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard

DEFAULT_PROMPT = "Describe this image in detail in one paragraph."

CAPTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption_synthetic", pa.string()),
        pa.field("caption_raw", pa.string()),
        pa.field("captioner", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("tokens_generated", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


class CaptionConfig(StageConfig):
    kind: Literal["caption"]

    # transformers: the pipeline's `captioner` model in each actor; openai: OpenAI-compatible servers (vLLM,
    # SGLang) that hold the model: `servers` the stage runs for its duration, or `endpoints` the user runs
    backend: Literal["transformers", "openai"] = "transformers"
    servers: ServersConfig | None = None
    endpoints: tuple[str, ...] = ()  # base URLs ending in /v1, e.g. http://gpu-node-1:8000/v1
    client: ClientConfig = ClientConfig()
    prompt: str = DEFAULT_PROMPT  # the instruction, put in the model's chat template with the image
    system_prompt: str | None = None
    # the whole prompt, used as it is without a chat template: for models trained on task prompts and
    # having no template (PaliGemma "<image>caption en", Florence-2 "<MORE_DETAILED_CAPTION>", BLIP-2)
    task_prompt: str | None = None
    max_new_tokens: PositiveInt = 128
    # rows whose prompt + image tokens exceed this get `too_long`; default: the model's context window
    # (less max_new_tokens for decoder-only models)
    max_input_tokens: PositiveInt | None = None
    do_sample: bool = False  # greedy by default: reproducible, and batch results equal one-by-one results
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: PositiveInt | None = None
    num_beams: PositiveInt = 1
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int = 0  # for sampling
    attn_implementation: str | None = None  # "sdpa", "flash_attention_2", "eager"; default: transformers' choice
    model_class: str | None = None  # e.g. transformers.LlavaForConditionalGeneration; default: the Auto class
    trust_remote_code: bool = False
    processor_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to AutoProcessor.from_pretrained
    clean: bool = True  # clean the text (curate.caption.text); the raw text is kept in caption_raw either way
    max_image_side: PositiveInt | None = 1024  # downscale larger images before the processor; None: as stored
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # decode limit (curate.images)
    decode_threads: PositiveInt = 4
    keep_from: str | None = None  # a joined stage with `key` + `keep` (dedup, filter): keep=false rows are skipped

    @model_validator(mode="after")
    def _keep_source_is_joined(self) -> CaptionConfig:
        check_keep_from(self.keep_from, self.join)
        if self.backend == "transformers":
            given = [f for f in ("servers", "endpoints", "client") if f in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only used with backend: openai")
            return self
        if (self.servers is None) == (not self.endpoints):
            raise ValueError("backend openai needs `servers` (the stage runs them) or `endpoints` (you run them)")
        if self.endpoints and self.client.model is None:
            raise ValueError("client.model: the served model name is needed with `endpoints`")
        bad = [u for u in self.endpoints if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"endpoints: not http(s) URLs: {', '.join(bad)}")
        if self.servers is not None and self.resources.num_gpus:
            raise ValueError(
                "resources.num_gpus: the servers hold the GPUs (servers.num_gpus); the stage's workers only send "
                "requests, so give them none"
            )
        if self.task_prompt is not None or self.max_input_tokens is not None:
            raise ValueError(
                "task_prompt and max_input_tokens are for backend: transformers (an OpenAI-compatible server "
                "applies the model's chat template to `prompt` and refuses over-long inputs itself)"
            )
        return self

    @property
    def model_roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("captioner",) if self.backend == "transformers" else ()

    @property
    def served_model(self) -> str:
        """The model name requests ask for (and `/v1/models` must list)."""
        name = self.client.model or (self.servers.served_name if self.servers else None)
        assert name is not None
        return name

    def fingerprint(self) -> str:
        """As every stage's, less the settings that decide no caption: where the servers run and how hard the
        client presses them may change between resumed runs, the model and the generation settings may not."""
        exclude: dict[str, Any] = {"resources": True, "name": True, "endpoints": True}
        exclude["client"] = set(ClientConfig.operational)
        if self.servers is not None:
            exclude["servers"] = set(ServersConfig.operational)
        data = self.model_dump(exclude=exclude, mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def prompt_column(self) -> str:
        """What the `prompt` column records: the task prompt when one is given, else the instruction."""
        return self.task_prompt if self.task_prompt is not None else self.prompt

    def check_models(self, models: dict[str, ModelSpec]) -> list[tuple[tuple[Any, ...], str]]:
        """Whether transformers can drive the captioner, from its config and processor files (no weights)."""
        if self.backend != "transformers":
            return []
        from curate.caption.preflight import drivable_problems

        return drivable_problems(models["captioner"], self.loading(), self.generation(), self.max_image_side)

    def generation(self) -> GenerationOptions:
        return GenerationOptions(
            prompt=self.prompt,
            system_prompt=self.system_prompt,
            task_prompt=self.task_prompt,
            max_input_tokens=self.max_input_tokens,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
        )

    def loading(self) -> LoadOptions:
        return LoadOptions(
            attn_implementation=self.attn_implementation,
            model_class=self.model_class,
            trust_remote_code=self.trust_remote_code,
            processor_kwargs=dict(self.processor_kwargs),
        )


def services(config: CaptionConfig, context: WorkContext, log: Callable[[str], None]):
    """The inference servers for the whole stage (none for the transformers backend): their URLs reach every
    worker as `context.services`."""
    if config.backend != "openai":
        return contextlib.nullcontext(None)
    logs = storage.join(context.run_uri, context.stage_name, "_servers")
    return serving(config.servers, list(config.endpoints), config.served_model, logs, log)


def setup(config: CaptionConfig, context: WorkContext) -> Captioner | StreamCaptioner:
    if config.backend == "openai":
        urls = list(context.services or config.endpoints)
        budget = None
        if config.client.max_image_pixels is None and config.servers is not None:
            budget = model_pixel_budget(config.servers.model)
        via = config.servers.engine if config.servers is not None else "openai"
        name = f"{config.served_model} via {via}"
        return StreamCaptioner(
            urls, config.served_model, config.generation(), config.client, name, config.decode_threads, budget
        )
    return Captioner(context.models["captioner"], config.loading(), config.generation())


def process(config: CaptionConfig, task: ShardTask, context: WorkContext, captioner: Captioner) -> ShardOutput:
    started = time.perf_counter()
    uri = context.upstream_shard(task.index)
    sizes = [c for c in ("width", "height") if c in storage.parquet_file(uri).schema_arrow.names]
    upstream = storage.read_parquet(uri, columns=["key", "image", "status", *sizes])
    selection = select_rows(upstream, keep_table_for(context, config.keep_from, task.index))
    keys = upstream["key"].to_pylist()
    rows: list[dict[str, Any]] = [
        {"key": key, "captioner": captioner.name, "prompt": config.prompt_column, "status": s[0], "error": s[1]}
        if s is not None
        else {"key": key, "captioner": captioner.name, "prompt": config.prompt_column}
        for key, s in zip(keys, selection.skip, strict=True)
    ]
    image_column = upstream["image"]
    fetch = lambda i: image_column[i].as_py()  # noqa: E731
    if isinstance(captioner, StreamCaptioner):
        extra = _caption_stream(config, captioner, selection.process, fetch, rows)
    else:
        extra = _caption_batches(config, captioner, by_size(upstream, selection.process), fetch, rows, task.index)
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    generated = [r for r in rows if r.get("caption_raw") is not None]
    extra = {
        "fed_to_model": extra.pop("fed_to_model"),
        "too_long": extra.pop("too_long", 0),
        "captioned": sum(1 for r in rows if r.get("status") == "ok"),
        "tokens_generated": sum(r["tokens_generated"] or 0 for r in generated),
        "truncated": sum(1 for r in generated if r.get("truncated")),
        **extra,
        "seconds": round(time.perf_counter() - started, 4),
    }
    return ShardOutput(table, extra)


def _caption_batches(
    config: CaptionConfig,
    captioner: Captioner,
    todo: list[int],
    fetch: Callable[[int], bytes],
    rows: list[dict[str, Any]],
    shard: int,
) -> dict[str, Any]:
    """The transformers backend: prepared batches through the model in this actor."""
    batch_size = config.resources.batch_size or 8
    if config.do_sample:
        import torch

        torch.manual_seed(config.seed + shard)
    wait = generate_seconds = 0.0
    batches = retried = fed = too_long = 0
    with ThreadPoolExecutor(config.decode_threads, thread_name_prefix="caption-decode") as pool:
        load = functools.partial(decode, fetch, max_pixels=config.max_pixels, max_side=config.max_image_side)
        stream = prepared_batches(captioner, load, todo, batch_size, pool)
        while True:
            t0 = time.perf_counter()
            nxt = next(stream, None)
            wait += time.perf_counter() - t0
            if nxt is None:
                break
            if isinstance(nxt, Item):
                rows[nxt.row].update(status=nxt.status, error=nxt.error)
                continue
            t1 = time.perf_counter()
            results = run_batch(captioner, nxt)
            generate_seconds += time.perf_counter() - t1
            batches += bool(nxt.items)
            fed += len(nxt.items)
            too_long += len(nxt.too_long)
            retried += nxt.failed is not None or any(o.status in ("caption_error", "oom") for _, o in results)
            for item, outcome in results:
                rows[item.row].update(_caption_row(config, outcome))
    return {
        "fed_to_model": fed,
        "too_long": too_long,
        "batches": batches,
        "batches_retried": retried,
        "generate_seconds": round(generate_seconds, 4),
        "input_wait_seconds": round(wait, 4),
    }


def _caption_stream(
    config: CaptionConfig,
    captioner: StreamCaptioner,
    todo: list[int],
    fetch: Callable[[int], bytes],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The openai backend: every row a request, streamed to the servers (curate.caption.stream)."""

    def load(row: int) -> Image.Image | Failure:
        item = decode(fetch, row, config.max_pixels, config.max_image_side)
        return item.image if item.image is not None else Failure(item.status or "decode_error", item.error or "")

    results, counters = captioner.caption(todo, load)
    fed = 0
    for row, result in results.items():
        if isinstance(result, Failure):
            rows[row].update(status=result.status, error=result.error)
        else:
            fed += 1
            rows[row].update(_caption_row(config, outcome_of(result)))
    return {
        "fed_to_model": fed,
        "requests": counters.requests,
        "retries": counters.retries,
        "pushed_back": counters.pushed_back,
        "timeouts": counters.timeouts,
        "moved": counters.moved,
        "server_downs": counters.server_downs,
        "in_flight_peak": counters.in_flight_peak,
        "window_min": min(s.window.lowest for s in captioner.servers),
        "generate_seconds": counters.seconds,
        "input_wait_seconds": counters.input_wait_seconds,
    }


def _caption_row(config: CaptionConfig, outcome: Outcome) -> dict[str, Any]:
    if outcome.generated is None:
        return {"status": outcome.status, "error": outcome.error}
    g = outcome.generated
    text = clean_caption(g.text, g.truncated) if config.clean else g.text
    status, error = ("ok", None) if text.strip() else ("empty_caption", "the model generated no text")
    return {
        "caption_synthetic": text if status == "ok" else None,
        "caption_raw": g.text,
        "tokens_generated": g.tokens,
        "truncated": g.truncated,
        "status": status,
        "error": error,
    }


def describe(config: CaptionConfig) -> str:
    keep = f"; skips keep=false rows of {config.keep_from}" if config.keep_from else ""
    mode = "greedy" if not config.do_sample else "sampling"
    prompt = f"task prompt {config.task_prompt!r}" if config.task_prompt is not None else f"prompt {config.prompt!r}"
    where = ""
    if config.servers is not None:
        s = config.servers
        many = {"auto": f"one per {s.num_gpus:g} GPUs", "per_node": "one per node"}.get(str(s.replicas), s.replicas)
        where = f"; on {s.engine} servers of {s.model} ({many}, {s.num_gpus:g} GPUs each)"
    elif config.endpoints:
        where = f"; on {len(config.endpoints)} servers you run ({config.served_model})"
    return f"{prompt}, {config.max_new_tokens} new tokens, {mode}{keep}{where}"


SPEC = StageSpec(
    kind="caption",
    config=CaptionConfig,
    summary="synthetic captions from a vision-language model (transformers or inference servers), beside the originals",
    schema=CAPTION_SCHEMA,
    plan=one_task_per_upstream_shard,
    process=process,
    setup=setup,
    describe_inputs=describe,
    services=services,
)
