"""Keep every server full: a shard's rows streamed to several OpenAI-compatible servers, no batch barrier.

An inference engine (vLLM, SGLang) runs as many sequences as it holds at once and starts a waiting one the moment
another finishes, so it is only as busy as the requests it has. This client keeps a window of requests in flight
on each server (`curate.caption.window`) for the whole shard: each answer frees a slot that the next prepared
image fills at once, so one long caption never holds up the others (the batch-at-a-time client it replaces waited
for the slowest of each batch of eight).

- Images are decoded, downscaled to the model's pixel budget and encoded on `decode_threads` threads, a bounded
  number ahead of the senders (memory: at most the windows plus the look-ahead, one encoded request each).
- A new request goes to the live server with the most free room (in flight relative to its window).
- 429 and 503 halve that server's window and send the request again after a backoff (the server's Retry-After
  when it gives one), without counting against the row. Other failures (500/502/504, timeouts, a dropped
  connection, the attempts that reached a server) count: after `retries` of them the row gets `http_error`.
  A 4xx answer is final at once (`http_error` with the server's message).
- A server that refuses connections, drops one or times out is probed (`GET /v1/models`); while it does not
  answer, nothing is sent to it, its requests in flight are cancelled and sent to the others, and it is probed
  again with backoff until it comes back (a restarted server) . A request that never reached a server costs no
  attempt.
- If no row finishes for `unavailable_timeout_s` (every server down, hung or refusing), the shard fails with
  `ServersUnavailable`: a shard error, redone by the next run, never a row status.

Written on asyncio + aiohttp (one event loop per shard, threads only for image work). Considered: the `openai`
client (retries, but one base_url and no shared window), LiteLLM's router (balancing with cooldowns, but a large
dependency and no adaptive window), Ray Data LLM's HTTP processor (requests per batch, one URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from curate.caption.client import (
    Answer,
    ClientConfig,
    RequestFailed,
    encode_image,
    headers,
    parse_answer,
    request_body,
    served_models,
)
from curate.caption.vlm import GenerationOptions
from curate.caption.window import Window

PUSH_BACK = {429, 503}  # the server is busy: try again later, not the row's fault
RETRIED = {408, 409, 425, 500, 502, 504}  # count against the row's retries
PROBE_TIMEOUT_S = 10.0


class ServersUnavailable(Exception):
    """No server answered for too long: the shard fails and is redone on the next run."""


@dataclass(frozen=True)
class Failure:
    """A row that never became a request (its image did not decode): its status and message."""

    status: str
    error: str


@dataclass
class Request:
    row: int
    body: bytes
    attempts: int = 0  # failures that count against `retries`
    pushed_back: int = 0
    last_error: str = ""


@dataclass
class Server:
    url: str  # base URL, ending in /v1
    window: Window
    in_flight: int = 0
    up: bool = True
    answered: int = 0
    sending: set[asyncio.Task] = field(default_factory=set)
    probe: asyncio.Task | None = None

    @property
    def room(self) -> float:
        return (self.window.limit - self.in_flight) / self.window.limit


@dataclass
class Counters:
    requests: int = 0  # HTTP attempts sent
    retries: int = 0  # failed attempts that counted against a row
    pushed_back: int = 0  # 429 / 503 answers
    timeouts: int = 0
    moved: int = 0  # requests taken off a server that went down, sent elsewhere
    server_downs: int = 0
    in_flight_peak: int = 0
    input_wait_seconds: float = 0.0  # a window had room and no image was ready
    seconds: float = 0.0


class StreamCaptioner:
    """Held by a caption worker for all its shards: the servers' windows and states carry over between shards."""

    def __init__(
        self,
        urls: list[str],
        model: str,
        options: GenerationOptions,
        config: ClientConfig,
        name: str,
        decode_threads: int = 4,
        max_pixels: int | None = None,
    ):
        if not urls:
            raise ValueError("no server to send requests to")
        self.servers = [Server(u.rstrip("/"), Window(config.max_in_flight, config.min_in_flight)) for u in urls]
        self.model, self.options, self.config, self.name = model, options, config, name
        self.max_pixels = max_pixels or config.max_image_pixels
        self.threads = decode_threads
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="caption-encode")
        self.headers = headers(config)

    def caption(
        self, rows: list[int], load: Callable[[int], Image.Image | Failure]
    ) -> tuple[dict[int, Answer | Failure], Counters]:
        """Every row's answer (or why it has none) and the shard's counters. ``load`` decodes a row's image."""
        return asyncio.run(_Run(self, rows, load).run())

    def prepare(self, row: int, load: Callable[[int], Image.Image | Failure]) -> Request | Failure:
        image = load(row)
        if isinstance(image, Failure):
            return image
        return Request(row, request_body(self.model, self.options, encode_image(image, self.config, self.max_pixels)))


class _Run:
    """One shard's streaming: the tasks below share this state on one event loop."""

    def __init__(self, client: StreamCaptioner, rows: list[int], load: Callable[[int], Image.Image | Failure]):
        self.client, self.rows, self.load = client, rows, load
        self.config = client.config
        self.results: dict[int, Answer | Failure] = {}
        self.ready: deque[Request] = deque()  # prepared or due for another attempt
        self.preparing = 0
        self.prepared_all = False
        self.waiting = 0  # requests sleeping out a backoff
        self.wake = asyncio.Event()  # for the dispatcher: a request is ready, a slot freed, a server came back
        self.room = asyncio.Event()  # for the producer: the look-ahead has room
        self.counters = Counters()
        self.last_progress = time.monotonic()
        capacity = sum(s.window.maximum for s in client.servers)
        self.look_ahead = 2 * client.threads + capacity // 8

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> tuple[dict[int, Answer | Failure], Counters]:
        import aiohttp

        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector, headers=self.client.headers) as session:
            self.session = session
            for server in self.client.servers:
                if not server.up:
                    self._start_probe(server)
            producer = asyncio.create_task(self._produce())
            try:
                await self._dispatch()
                await producer
            finally:
                producer.cancel()
                for server in self.client.servers:
                    for task in [*server.sending, *([server.probe] if server.probe else [])]:
                        task.cancel()
                    server.sending.clear()
                    server.in_flight = 0
                    server.probe = None
        self.counters.seconds = round(time.monotonic() - started, 4)
        self.counters.input_wait_seconds = round(self.counters.input_wait_seconds, 4)
        return self.results, self.counters

    def _finish(self, row: int, result: Answer | Failure) -> None:
        self.results[row] = result
        self.last_progress = time.monotonic()
        self.wake.set()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self.results) < len(self.rows):
            server = self._pick()
            if server is not None and self.ready:
                self._send(server, self.ready.popleft())
                self.room.set()
                continue
            idle = server is not None and not self.ready and not self.prepared_all
            began = loop.time()
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            if idle:
                self.counters.input_wait_seconds += loop.time() - began
            if time.monotonic() - self.last_progress > self.config.unavailable_timeout_s:
                states = ", ".join(f"{s.url} {'up' if s.up else 'down'}" for s in self.client.servers)
                raise ServersUnavailable(
                    f"no server answered for {self.config.unavailable_timeout_s:.0f} s "
                    f"(client.unavailable_timeout_s); {len(self.rows) - len(self.results)} rows left; servers: {states}"
                )

    def _pick(self) -> Server | None:
        live = [s for s in self.client.servers if s.up and s.in_flight < s.window.limit]
        return max(live, key=lambda s: s.room) if live else None

    # -- preparing images ----------------------------------------------------------------------------
    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.client.threads)

        async def one(row: int) -> None:
            try:
                request = await loop.run_in_executor(self.client.pool, self.client.prepare, row, self.load)
            except Exception as e:  # encoding failed: the row's status, as a decode failure would be
                request = Failure("decode_error", f"{type(e).__name__}: {e}"[:2000])
            finally:
                slots.release()
                self.preparing -= 1
                self.room.set()
            if isinstance(request, Failure):
                self._finish(row, request)
            else:
                self.ready.append(request)
                self.wake.set()

        tasks = []
        for row in self.rows:
            while len(self.ready) + self.preparing >= self.look_ahead:
                self.room.clear()
                await self.room.wait()
            await slots.acquire()
            self.preparing += 1
            tasks.append(asyncio.create_task(one(row)))
        await asyncio.gather(*tasks)
        self.prepared_all = True
        self.wake.set()

    # -- sending ---------------------------------------------------------------------------------------
    def _send(self, server: Server, request: Request) -> None:
        server.in_flight += 1
        total = sum(s.in_flight for s in self.client.servers)
        self.counters.in_flight_peak = max(self.counters.in_flight_peak, total)
        task = asyncio.create_task(self._post(server, request))
        server.sending.add(task)
        task.add_done_callback(server.sending.discard)

    async def _post(self, server: Server, request: Request) -> None:
        import aiohttp

        epoch = server.window.epoch
        began = time.monotonic()
        self.counters.requests += 1
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self.session.post(
                server.url + "/chat/completions", data=request.body, timeout=timeout
            ) as response:
                status, payload = response.status, await response.read()
                retry_after = response.headers.get("Retry-After")
        except asyncio.CancelledError:  # its server went down: send it elsewhere, at no cost to the row
            server.in_flight -= 1
            self.counters.moved += 1
            self.ready.appendleft(request)
            self.wake.set()
            raise
        except aiohttp.ClientConnectorError as e:  # never reached the server
            server.in_flight -= 1
            request.last_error = f"{type(e).__name__}: {e}"
            self.ready.appendleft(request)
            self._suspect(server, down=True)
            return
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            server.in_flight -= 1
            timed_out = isinstance(e, asyncio.TimeoutError)
            if timed_out:
                self.counters.timeouts += 1
                server.window.on_push_back(epoch)
            what = f"no answer within {self.config.timeout_s:g} s" if timed_out else f"{type(e).__name__}: {e}"
            self._suspect(server, down=False)
            self._retry(request, what)
            return
        server.in_flight -= 1
        self._answered(server, request, epoch, began, status, payload, retry_after)

    def _answered(
        self, server: Server, request: Request, epoch: int, began: float, status: int, payload: bytes, retry_after
    ) -> None:
        if status == 200:
            server.window.on_answer(epoch, time.monotonic() - began)
            server.answered += 1
            try:
                result = Answer(parse_answer(json.loads(payload)))
            except (RequestFailed, ValueError) as e:
                result = Answer(None, e if isinstance(e, RequestFailed) else RequestFailed(f"not JSON: {e}"))
            self._finish(request.row, result)
            return
        detail = f"HTTP {status}: {payload[:500].decode('utf-8', 'replace')}"
        if status in PUSH_BACK:
            self.counters.pushed_back += 1
            server.window.on_push_back(epoch)
            request.pushed_back += 1
            request.last_error = detail
            self._later(request, _seconds(retry_after) or self._backoff(min(request.pushed_back, 6)))
        elif status in RETRIED:
            self._retry(request, detail)
        else:
            self._finish(request.row, Answer(None, RequestFailed(detail)))

    def _retry(self, request: Request, error: str) -> None:
        request.attempts += 1
        request.last_error = error
        if request.attempts > self.config.retries:
            message = f"{request.attempts} attempts failed; last: {error}"
            self._finish(request.row, Answer(None, RequestFailed(message)))
            return
        self.counters.retries += 1
        self._later(request, self._backoff(request.attempts))

    def _backoff(self, attempt: int) -> float:
        return self.config.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())

    def _later(self, request: Request, delay: float) -> None:
        self.waiting += 1

        def due() -> None:
            self.waiting -= 1
            self.ready.appendleft(request)
            self.wake.set()

        asyncio.get_running_loop().call_later(delay, due)
        self.wake.set()

    # -- servers that stop answering -------------------------------------------------------------------
    def _suspect(self, server: Server, down: bool) -> None:
        """Stop sending to ``server`` until a probe says it answers; with ``down``, it refused: take its
        requests in flight off it at once."""
        if down:
            self._down(server)
        elif server.up:
            server.up = False  # nothing new goes to it while the probe runs
        self._start_probe(server)
        self.wake.set()

    def _down(self, server: Server) -> None:
        if server.up or server.sending:
            self.counters.server_downs += 1
        server.up = False
        for task in list(server.sending):
            task.cancel()

    def _start_probe(self, server: Server) -> None:
        if server.probe is None or server.probe.done():
            server.probe = asyncio.create_task(self._probe(server))

    async def _probe(self, server: Server) -> None:
        import aiohttp

        delay = 0.1
        timeout = aiohttp.ClientTimeout(total=min(PROBE_TIMEOUT_S, self.config.timeout_s))
        while True:
            try:
                async with self.session.get(server.url + "/models", timeout=timeout) as response:
                    answer = json.loads(await response.read()) if response.status == 200 else {}
                ok = self.client.model in served_models(answer)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError):
                ok = False
            if ok:
                server.up = True
                self.wake.set()
                return
            self._down(server)
            self.wake.set()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(5.0, delay * 2)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
