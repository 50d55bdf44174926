"""A small OpenAI-compatible chat-completions server for tests and benchmarks on 127.0.0.1.

It answers `/v1/chat/completions` the way vLLM and SGLang do (images as data URLs, `max_tokens`, `temperature:
0` for greedy, `usage` and `finish_reason`, "length" when cut by max_tokens; bad input is a 400 with the
reason), lists its model at `/v1/models`, answers `/health`, and reports what it saw at `/stats`. It writes
its captions with one of two models:

- a real transformers VLM (`--model PATH`, through `curate.caption.vlm.Captioner`, the transformers backend's
  own generation code), one request at a time: the captions are the model's;
- the engine model (no `--model`): the cost structure of an inference engine with continuous batching, for
  testing and measuring the client and the server orchestration, not captions. Up to `slots` sequences run at
  once (more wait in a queue, as in vLLM's scheduler); each costs `prefill_s` plus `step_s` per generated
  token, and the caption's length (`min_tokens`..`max_tokens` words) and words follow from a hash of the image,
  so the same image always gets the same caption and lengths vary as real captions do.

Faults, as real servers show them: the first N completions answered 503 (`unavailable_first`, a server still
loading) or 500 (`error_first`); 429 above `reject_above` requests in flight (a server or gateway with a queue
limit); a storm of 429s for M requests after the K-th (`storm_after`, `storm_count`); every request hanging after K
completions (`hang_after`, a wedged GPU); the process SIGKILLing itself at its K-th completion, before answering
it (`kill_after`, a crashed engine; only where the server runs as its own process). A test can change them on a
running server (`POST /control` with fields of `Behaviour`, or `{"hang": true}`). `python -m
curate.testing.openai_server --port P --served-model-name NAME ...` runs it as its own process, the way the caption
stage starts vLLM from a command template; on SIGTERM it prints its `/stats` and exits.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_TEXT = (
    "a red cat sits on the old wooden table near bright window with soft light and green plants under blue sky "
    "beside quiet river where small boats float past tall stone houses in warm evening"
)
WORDS = tuple(_TEXT.split(" "))


@dataclass
class Behaviour:
    """What the engine model costs and which faults the server shows."""

    slots: int = 16  # sequences generated at once; more requests wait for a slot
    prefill_s: float = 0.0
    step_s: float = 0.0  # per generated token
    min_tokens: int = 4
    max_tokens: int = 24  # the engine model's natural caption lengths (before the request's max_tokens)
    unavailable_first: int = 0
    error_first: int = 0
    reject_above: int | None = None
    storm_after: int | None = None
    storm_count: int = 0
    hang_after: int | None = None
    kill_after: int | None = None


@dataclass
class Stats:
    requests: int = 0  # completion requests received
    completed: int = 0  # answered 200
    answered: dict[str, int] = field(default_factory=dict)  # by HTTP status
    busy_seconds: float = 0.0  # slot-seconds of generation
    first_start: float | None = None  # wall-clock time of the first request / the last 200 answer
    last_end: float | None = None
    in_flight: int = 0
    peak_in_flight: int = 0
    running: int = 0
    peak_running: int = 0
    max_image_pixels: int = 0
    max_request_bytes: int = 0


class EngineModel:
    """Captions at an inference engine's cost: see the module docstring."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.slots = threading.Semaphore(behaviour.slots)

    def caption(self, image_bytes: bytes, max_tokens: int, stats: Stats, lock: threading.Lock) -> tuple[str, int, bool]:
        b = self.behaviour
        digest = hashlib.sha256(image_bytes).digest()
        natural = b.min_tokens + int.from_bytes(digest[:4], "little") % (b.max_tokens - b.min_tokens + 1)
        tokens = min(natural, max_tokens)
        words = [WORDS[(digest[4 + i % 28] + 7 * i) % len(WORDS)] for i in range(tokens)]
        seconds = b.prefill_s + tokens * b.step_s
        with self.slots:
            with lock:
                stats.running += 1
                stats.peak_running = max(stats.peak_running, stats.running)
            time.sleep(seconds)
            with lock:
                stats.running -= 1
                stats.busy_seconds += seconds
        text = " ".join(words).capitalize() + ("." if natural <= max_tokens else "")
        return text, tokens, natural > max_tokens


class ModelBackend:
    """A real transformers VLM (one generate at a time)."""

    def __init__(self, model_path: str):
        from curate.caption.vlm import Captioner, GenerationOptions, LoadOptions
        from curate.config import ModelSpec

        self.captioner = Captioner(ModelSpec(path=model_path), LoadOptions(), GenerationOptions(prompt=""))
        self.lock = threading.Lock()

    def caption(self, image: Any, prompt: str, system: str | None, max_tokens: int) -> tuple[str, int, bool]:
        with self.lock:
            inputs = self.captioner.prepare([image], self.captioner.render_prompt(prompt, system))
            generated = self.captioner.generate(inputs, max_new_tokens=max_tokens)[0]
        return generated.text, generated.tokens or 0, generated.truncated


class CompletionServer:
    """The server; `with CompletionServer(...) as s:` serves on ``s.base_url`` in a background thread."""

    def __init__(
        self,
        model_path: str | None = None,
        served_name: str = "tiny-vlm",
        behaviour: Behaviour | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        **faults: Any,
    ):
        self.behaviour = behaviour or Behaviour(**faults)
        self.model = ModelBackend(model_path) if model_path else None
        self.engine = EngineModel(self.behaviour)
        self.served_name = served_name
        self.stats = Stats()
        self.lock = threading.Lock()
        self.hung = threading.Event()
        self.stopped = threading.Event()
        ThreadingHTTPServer.request_queue_size = 1024  # listen backlog: engines' servers accept bursts of connects
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # hung handlers must not hold up shutdown
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> int:
        return self.stats.requests

    def __enter__(self) -> CompletionServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def control(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the behaviour of the running server (a test making one of two servers hang, say)."""
        with self.lock:
            if changes.pop("hang", False):
                self.hung.set()
            for name, value in changes.items():
                if not hasattr(self.behaviour, name):
                    return {"error": f"no setting {name!r}"}
                setattr(self.behaviour, name, value)
            return dict(self.behaviour.__dict__)

    def stats_dict(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.stats.__dict__, answered=dict(self.stats.answered))

    def hang(self) -> None:
        """Hold the calling handler until the server stops (a wedged engine)."""
        self.stopped.wait()

    def complete(self, body: dict[str, Any], size: int) -> tuple[int, dict[str, Any]]:
        b, s = self.behaviour, self.stats
        with self.lock:
            s.requests += 1
            number = s.requests
            now = time.time()
            s.first_start = s.first_start or now
            s.max_request_bytes = max(s.max_request_bytes, size)
            if b.unavailable_first and number <= b.unavailable_first:
                return 503, {"error": {"message": "server is loading", "type": "unavailable"}}
            if b.error_first and number <= b.unavailable_first + b.error_first:
                return 500, {"error": {"message": "internal error", "type": "InternalServerError"}}
            if b.storm_after is not None and b.storm_after < number <= b.storm_after + b.storm_count:
                return 429, {"error": {"message": "too many requests (storm)", "type": "rate_limited"}}
            if b.reject_above is not None and s.in_flight >= b.reject_above:
                return 429, {"error": {"message": f"over {b.reject_above} requests in flight", "type": "rate_limited"}}
            s.in_flight += 1
            s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
        try:
            return self._complete(body)
        finally:
            with self.lock:
                s.in_flight -= 1

    def _complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from PIL import Image

        if body.get("model") != self.served_name:
            return 404, {"error": {"message": f"model {body.get('model')!r} is not served"}}
        if float(body.get("temperature", 1.0)) != 0.0:
            return 400, {"error": {"message": "this test server decodes greedily only (temperature 0)"}}
        system, prompt, images = None, "", []
        for message in body["messages"]:
            content = message["content"]
            if message["role"] == "system":
                system = content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
                continue
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    prompt += part["text"]
                elif part["type"] == "image_url":
                    images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
        if len(images) != 1:
            return 400, {"error": {"message": f"expected one image, got {len(images)}"}}
        max_tokens = int(body.get("max_tokens", 16))
        try:
            image = Image.open(io.BytesIO(images[0]))
            with self.lock:
                self.stats.max_image_pixels = max(self.stats.max_image_pixels, image.width * image.height)
            if self.model is not None:
                text, tokens, cut = self.model.caption(image.convert("RGB"), prompt, system, max_tokens)
            else:
                text, tokens, cut = self.engine.caption(images[0], max_tokens, self.stats, self.lock)
        except (ValueError, OSError) as e:  # the processor refusing the input, as vLLM reports it
            return 400, {"error": {"message": str(e), "type": "BadRequestError"}}
        with self.lock:
            self.stats.completed += 1
            self.stats.last_end = time.time()
            if self.behaviour.hang_after is not None and self.stats.completed >= self.behaviour.hang_after:
                self.hung.set()
            if self.behaviour.kill_after is not None and self.stats.completed >= self.behaviour.kill_after:
                print(f"killing this server (pid {os.getpid()}) at completion {self.stats.completed}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return 200, {
            "id": f"cmpl-{self.stats.completed}",
            "object": "chat.completion",
            "model": self.served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if cut else "stop",
                }
            ],
            "usage": {"completion_tokens": tokens},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn serves

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with server.lock:
                    key = str(code)
                    server.stats.answered[key] = server.stats.answered.get(key, 0) + 1

            def do_GET(self) -> None:
                path = self.path.rstrip("/")
                if path == "/stats":
                    self._send(200, server.stats_dict())
                    return
                if server.hung.is_set():
                    server.hang()
                    return
                if path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.served_name, "object": "model"}]})
                elif path == "/health":
                    self._send(200, {})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(size)
                if self.path.rstrip("/") == "/control":
                    self._send(200, server.control(json.loads(data)))
                    return
                if server.hung.is_set():
                    server.hang()
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                self._send(*server.complete(json.loads(data), size))

        return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="tiny-vlm")
    parser.add_argument("--model", default=None, help="a transformers VLM folder; without: the engine model")
    parser.add_argument("--startup-s", type=float, default=0.0, help="seconds before listening (a model loading)")
    for name, value in Behaviour().__dict__.items():
        kind = float if isinstance(value, float) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    args = parser.parse_args(argv)
    behaviour = Behaviour(**{k: getattr(args, k) for k in Behaviour().__dict__})
    time.sleep(args.startup_s)
    server = CompletionServer(args.model, args.served_model_name, behaviour, args.host, args.port)
    print(f"serving {args.served_model_name} on {server.base_url}", flush=True)

    def stop(signum: int, frame: object) -> None:
        print(f"stopping on signal {signum}; stats: {json.dumps(server.stats_dict())}", flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with server:
        while server.thread.is_alive():
            server.thread.join(0.5)


if __name__ == "__main__":
    main()
