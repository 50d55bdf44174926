"""A small OpenAI-compatible chat-completions server running a transformers VLM, for tests on 127.0.0.1.

It serves a real model (through `curate.caption.vlm.Captioner`, the same generation code as the
transformers backend) the way vLLM and SGLang answer `/v1/chat/completions`: the model's chat template
applied to the messages, images as data URLs, `max_tokens`, `temperature: 0` for greedy, `usage`
and `finish_reason` ("length" when cut by max_tokens). Bad input is a 400 with the reason. With
`unavailable_first=N` the first N completions are answered 503, as a server still loading or shedding
load does, so clients' retries are exercised.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from curate.caption.vlm import Captioner, GenerationOptions, LoadOptions
from curate.config import ModelSpec


class CompletionServer:
    def __init__(self, model_path: str, served_name: str = "tiny-vlm", unavailable_first: int = 0):
        self.captioner = Captioner(ModelSpec(path=model_path), LoadOptions(), GenerationOptions(prompt=""))
        self.served_name = served_name
        self.unavailable_left = unavailable_first
        self.requests = 0
        self.lock = threading.Lock()  # one generate at a time on the one model
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> CompletionServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests += 1
            if self.unavailable_left > 0:
                self.unavailable_left -= 1
                return 503, {"error": {"message": "server is loading", "type": "unavailable"}}
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
                    data = part["image_url"]["url"].split(",", 1)[1]
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        if len(images) != 1:
            return 400, {"error": {"message": f"expected one image, got {len(images)}"}}
        try:
            with self.lock:
                inputs = self.captioner.prepare(images, self.captioner.render_prompt(prompt, system))
                generated = self.captioner.generate(inputs, max_new_tokens=int(body.get("max_tokens", 16)))[0]
        except ValueError as e:  # the processor refusing the input, as vLLM reports it
            return 400, {"error": {"message": str(e), "type": "BadRequestError"}}
        return 200, {
            "id": f"cmpl-{self.requests}",
            "object": "chat.completion",
            "model": self.served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generated.text},
                    "finish_reason": "length" if generated.truncated else "stop",
                }
            ],
            "usage": {"completion_tokens": generated.tokens},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.served_name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self._send(*server.complete(body))

        return Handler
