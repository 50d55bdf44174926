"""A real HTTP server for the download tests and benchmark: serves generated images and misbehaviours
on 127.0.0.x and logs every request it receives (so a test can prove an address was never contacted).
"""

from __future__ import annotations

import functools
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=1)
def _base() -> Image.Image:
    """A photo (scikit-image's astronaut) when available, else smooth noise; loaded once."""
    try:
        from skimage import data

        return Image.fromarray(data.astronaut())
    except Exception:
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((512, 512))


def image_bytes(width: int, height: int, fmt: str = "JPEG", seed: int = 0, **save: object) -> bytes:
    """A photo-like test image of the given size: a seed-dependent crop of the base photo."""
    base = _base()
    rng = np.random.default_rng(seed)
    left, top = int(rng.integers(0, 128)), int(rng.integers(0, 128))
    image = base.crop((left, top, left + 384, top + 384)).resize((width, height))
    buffer = io.BytesIO()
    if fmt == "JPEG":
        save.setdefault("quality", 90)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line
    trickle: float = 0.0  # seconds between single body bytes (a server that trickles)


@dataclass
class RequestLog:
    entries: list[tuple[str, str]] = field(default_factory=list)  # (server address, path)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, address: str, path: str) -> None:
        with self.lock:
            self.entries.append((address, path))

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def paths(self, address: str | None = None) -> list[str]:
        with self.lock:
            return [p for a, p in self.entries if address is None or a == address]


def _handler(routes: dict[str, Route], log: RequestLog, address: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            log.add(address, self.path)
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                route = Route(b"not found", 404, "text/plain")
            if route.delay:
                time.sleep(route.delay)
            try:
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                self.send_header("Connection", "close")
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if route.trickle:
                    for i in range(len(route.body)):
                        self.wfile.write(route.body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(route.trickle)
                else:
                    self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default 5 makes bursts of connections wait for SYN retries (1 s)


@dataclass
class Server:
    host: str
    port: int
    routes: dict[str, Route]
    log: RequestLog
    httpd: ThreadingHTTPServer

    scheme: str = "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(
    host: str,
    routes: dict[str, Route],
    log: RequestLog | None = None,
    port: int = 0,
    tls: tuple[str, str] | None = None,
) -> Server:
    """Start a threading HTTP server on ``host`` (a 127.0.0.x address only) in a daemon thread;
    with ``tls`` (certificate file, key file) it speaks HTTPS."""
    assert host.startswith("127."), "tests only ever bind loopback addresses"
    log = log or RequestLog()
    httpd = _Server((host, port), _handler(routes, log, host))
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return Server(host, httpd.server_address[1], routes, log, httpd, "https" if tls else "http")


def add_route(server: Server, path: str, make: Callable[[], Route]) -> str:
    server.routes[path] = make()
    return server.url(path)
