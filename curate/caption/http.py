"""Captions from an OpenAI-compatible chat-completions server (vLLM, SGLang) the user runs on the cluster.

Same interface as `curate.caption.vlm.Captioner`, so the caption stage's batching, prefetching and status
handling are shared: `prepare` encodes each decoded image as a data URL (in the background thread),
`generate` sends one request per image with at most `max_concurrency` in flight per actor. Connection
errors, timeouts, 429 and 5xx answers are retried with exponential backoff; a request that still fails,
or a 4xx answer, becomes that row's `http_error` status. The server applies the model's chat template.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import Field, PositiveFloat, PositiveInt

from curate.caption.vlm import Generated, GenerationOptions
from curate.config import Strict

RETRIED_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Endpoint(Strict):
    """Where the server is and how hard to press it."""

    base_url: str = Field(description="e.g. http://head-node:8000/v1")
    model: str  # the served model name, as the server's /v1/models lists it
    api_key_env: str | None = None  # environment variable holding the API key, if the server wants one
    max_concurrency: PositiveInt = 16  # requests in flight per actor
    timeout_s: PositiveFloat = 120.0
    retries: int = Field(4, ge=0)
    backoff_s: PositiveFloat = 0.5  # first retry delay; doubles each time, with jitter
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)


class HttpError(Exception):
    """A request that failed for good; `status` is the row status."""

    def __init__(self, message: str, status: str = "http_error"):
        super().__init__(message)
        self.status = status


@dataclass
class HttpResult:
    generated: Generated | None
    error: HttpError | None = None


def encode_image(image: Image.Image, endpoint: Endpoint) -> str:
    buffer = io.BytesIO()
    if endpoint.image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=endpoint.jpeg_quality)
    return f"data:image/{endpoint.image_format};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class HttpCaptioner:
    """Holds no model; one actor can keep many requests in flight."""

    def __init__(self, endpoint: Endpoint, options: GenerationOptions):
        self.endpoint = endpoint
        self.options = options
        self.name = f"{endpoint.model} via {endpoint.base_url.rstrip('/')}"
        self.url = endpoint.base_url.rstrip("/") + "/chat/completions"
        self.pool = ThreadPoolExecutor(endpoint.max_concurrency, thread_name_prefix="caption-http")
        key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def prepare(self, images: list[Image.Image]) -> list[str]:
        return [encode_image(image, self.endpoint) for image in images]

    def request_body(self, data_url: str) -> dict[str, Any]:
        o = self.options
        messages: list[dict[str, Any]] = []
        if o.system_prompt:
            messages.append({"role": "system", "content": o.system_prompt})
        content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": o.prompt}]
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": messages, "max_tokens": o.max_new_tokens}
        if o.do_sample:
            body.update({k: v for k, v in (("temperature", o.temperature), ("top_p", o.top_p)) if v is not None})
            if o.top_k is not None:
                body["top_k"] = o.top_k  # vLLM and SGLang accept it as an extra parameter
        else:
            body["temperature"] = 0.0
        if o.repetition_penalty is not None:
            body["repetition_penalty"] = o.repetition_penalty
        return body

    def too_long(self, inputs: list[str]) -> dict[int, str]:
        """None here: the server knows its model's context and refuses an over-long request (`http_error`)."""
        return {}

    def generate(self, inputs: list[str]) -> list[HttpResult]:
        return list(self.pool.map(self._one, inputs))

    def _one(self, data_url: str) -> HttpResult:
        try:
            return HttpResult(self._parse(self._post(self.request_body(data_url))))
        except HttpError as e:
            return HttpResult(None, e)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body).encode()
        delay = self.endpoint.backoff_s
        last = ""
        for attempt in range(self.endpoint.retries + 1):
            if attempt:
                time.sleep(delay * (0.5 + random.random()))
                delay *= 2
            request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.endpoint.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code not in RETRIED_STATUS:
                    raise HttpError(last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise HttpError(f"{self.endpoint.retries + 1} attempts failed; last: {last}")

    def _parse(self, answer: dict[str, Any]) -> Generated:
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise HttpError(f"unexpected answer: {json.dumps(answer)[:300]}") from None
        tokens = (answer.get("usage") or {}).get("completion_tokens")
        return Generated(text, int(tokens) if tokens is not None else None, choice.get("finish_reason") == "length")
