"""What the caption stage sends an OpenAI-compatible server (vLLM, SGLang) and how it reads the answer.

One request per image: the image, downscaled to the model's pixel budget and encoded as a data URL, in a user
turn with the prompt (after a system turn when there is a system prompt); `max_tokens`; `temperature: 0` unless
sampling. The server applies the model's chat template. The answer gives the text, `usage.completion_tokens`
and `finish_reason` ("length": cut by max_tokens). How requests are kept in flight is `curate.caption.stream`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from PIL import Image
from pydantic import Field, PositiveFloat, PositiveInt

from curate.caption.vlm import Generated, GenerationOptions
from curate.config import Strict


class ClientConfig(Strict):
    """How the stage talks to its servers (`client:` of a caption stage with `backend: openai`)."""

    model: str | None = None  # the served model name; default: the managed servers' name. Checked against /v1/models
    api_key_env: str | None = None  # environment variable holding the API key, if the servers want one
    # requests in flight per server from each caption worker; the window starts here, halves on 429/503 and
    # timeouts, and grows back by one per window of answers while latency holds
    max_in_flight: PositiveInt = 64
    min_in_flight: PositiveInt = 1
    timeout_s: PositiveFloat = 600.0  # one request, queueing in the server included
    retries: int = Field(4, ge=0)  # failed attempts per row (5xx, timeouts, dropped connections) before http_error
    backoff_s: PositiveFloat = 0.5  # first retry delay; doubles each time, with jitter
    # no answer from any server for this long (all down, hung or refusing): the shard fails, to be redone
    unavailable_timeout_s: PositiveFloat = 900.0
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    # images are downscaled (aspect kept) to at most this many pixels before encoding; default: the model's own
    # budget when its processor files can be read here (see drive.pixel_budget), else only `max_image_side`
    max_image_pixels: PositiveInt | None = None

    # settings that decide no caption (they may change between resumed runs)
    operational: ClassVar[tuple[str, ...]] = (
        "api_key_env",
        "max_in_flight",
        "min_in_flight",
        "timeout_s",
        "retries",
        "backoff_s",
        "unavailable_timeout_s",
    )


class RequestFailed(Exception):
    """A request that failed for good; `status` is the row status."""

    def __init__(self, message: str, status: str = "http_error"):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    """One row's outcome: what the model wrote, or why there is nothing."""

    generated: Generated | None
    error: RequestFailed | None = None


def downscale(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """The image with at most ``max_pixels`` pixels, aspect kept (Pillow's reducing resize, bicubic)."""
    if max_pixels is None or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_image(image: Image.Image, config: ClientConfig, max_pixels: int | None) -> str:
    image = downscale(image, max_pixels)
    buffer = io.BytesIO()
    if config.image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=config.jpeg_quality)
    return f"data:image/{config.image_format};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request_body(model: str, options: GenerationOptions, data_url: str) -> bytes:
    o = options
    messages: list[dict[str, Any]] = []
    if o.system_prompt:
        messages.append({"role": "system", "content": o.system_prompt})
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": o.prompt}]
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": o.max_new_tokens}
    if o.do_sample:
        body.update({k: v for k, v in (("temperature", o.temperature), ("top_p", o.top_p)) if v is not None})
        if o.top_k is not None:
            body["top_k"] = o.top_k  # vLLM and SGLang accept it as an extra parameter
    else:
        body["temperature"] = 0.0
    if o.repetition_penalty is not None:
        body["repetition_penalty"] = o.repetition_penalty
    return json.dumps(body).encode()


def headers(config: ClientConfig) -> dict[str, str]:
    key = os.environ.get(config.api_key_env) if config.api_key_env else None
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def parse_answer(answer: Any) -> Generated:
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise RequestFailed(f"unexpected answer: {json.dumps(answer)[:300]}") from None
    tokens = (answer.get("usage") or {}).get("completion_tokens")
    return Generated(text, int(tokens) if tokens is not None else None, choice.get("finish_reason") == "length")


def served_models(answer: Any) -> list[str]:
    """Model ids of a `/v1/models` answer."""
    try:
        return [str(m["id"]) for m in answer["data"]]
    except (KeyError, TypeError):
        return []
