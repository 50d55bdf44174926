"""Inference servers for the caption stage: started for the stage and stopped with it, or run by the user.

`servers:` (managed): the stage starts one server per `num_gpus` GPUs of the cluster (`replicas: auto`), one per
node (`per_node`) or a fixed number, each a Ray actor that reserves its GPUs and CPUs and runs the engine's
command (`curate.caption.server_process`). The command is a template: the engine's own (below) or `command`, with
`{model}`, `{served_model_name}`, `{port}`, `{host}`, `{num_gpus}` and `{python}` filled in, plus `extra_args`.
Data or tensor parallelism inside a server is the template's business (`--tensor-parallel-size {num_gpus}`).
They live for the whole stage: started before its first shard, stopped after its last one or when the run stops
(an exception, Ctrl-C or SIGTERM turned into one), and their processes die with the actor or the driver even when
those are killed (`curate.caption.launch`).

`endpoints:` (user-run): URLs of servers that are already running, balanced the same way.

Either way, before any row is sent every server must answer `/v1/models` and list the model the client asks for.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from curate.caption.client import served_models
from curate.caption.server_process import ServerActor, ServerFailed, ServerSpec
from curate.config import Strict

# The engines' OpenAI-compatible servers. Flags for the engine itself (--max-num-seqs, --max-model-len,
# --gpu-memory-utilization, --limit-mm-per-prompt, --trust-remote-code, ...) go in `extra_args`.
ENGINE_COMMANDS = {
    "vllm": (
        "vllm serve {model} --host {host} --port {port} --served-model-name {served_model_name} "
        "--tensor-parallel-size {num_gpus}"
    ),
    "sglang": (
        "{python} -m sglang.launch_server --model-path {model} --host {host} --port {port} "
        "--served-model-name {served_model_name} --tp-size {num_gpus}"
    ),
}
PLACEHOLDERS = ("model", "served_model_name", "port", "host", "num_gpus", "python")


class ServersError(Exception):
    """The servers cannot serve the stage (none started, or the model is not the one they serve)."""


class ServersConfig(Strict):
    """`servers:` of a caption stage with `backend: openai`."""

    engine: Literal["vllm", "sglang", "command"] = "vllm"
    command: str | None = None  # a template replacing the engine's (required for engine: command)
    model: str  # {model}: what the engine loads, a hub id or a path on every node
    served_model_name: str | None = None  # {served_model_name}; default: model
    extra_args: tuple[str, ...] = ()  # appended to the command
    env: dict[str, str] = Field(default_factory=dict)  # added to the server's environment
    num_gpus: NonNegativeFloat = 1.0  # {num_gpus}: GPUs each server reserves (its tensor-parallel size)
    num_cpus: NonNegativeFloat = 1.0  # CPUs each server reserves
    # how many: `auto` one per num_gpus GPUs of each node, `per_node` one per node (with num_gpus free), or a number
    replicas: Literal["auto", "per_node"] | PositiveInt = "auto"
    host: str = "0.0.0.0"  # {host}: the address servers bind; 0.0.0.0: reached at the node's IP
    port: PositiveInt | None = None  # first port on each node (then +1 per server); default: a free port
    startup_timeout_s: PositiveFloat = 1800.0  # a hub download and a model load, the first time
    max_restarts: int = Field(3, ge=0)  # per server, when its process exits during the stage
    stop_timeout_s: PositiveFloat = 30.0  # SIGTERM, then SIGKILL to the server's process group

    # settings that decide no caption (they may change between resumed runs)
    operational: ClassVar[tuple[str, ...]] = (
        "extra_args",
        "env",
        "num_gpus",
        "num_cpus",
        "replicas",
        "host",
        "port",
        "startup_timeout_s",
        "max_restarts",
        "stop_timeout_s",
    )

    @model_validator(mode="after")
    def _template(self) -> ServersConfig:
        if self.engine == "command" and not self.command:
            raise ValueError("engine: command needs `command`, the server's command template")
        if self.replicas == "auto" and self.num_gpus == 0:
            raise ValueError("replicas: auto means one server per num_gpus GPUs; with num_gpus 0 give a number")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError("num_gpus above 1 must be whole (it is the tensor-parallel size)")
        words = self.words()
        try:
            filled = [w.format(**dict.fromkeys(PLACEHOLDERS, "x")) for w in words]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"command template: unknown placeholder or stray brace {e} (known: {', '.join(PLACEHOLDERS)}; "
                "write {{ and }} for literal braces)"
            ) from None
        if not any("{port}" in w for w in words):
            raise ValueError("command template: no {port}; the stage gives each server its port")
        del filled
        return self

    @property
    def template(self) -> str:
        return self.command or ENGINE_COMMANDS[self.engine]

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    def words(self) -> tuple[str, ...]:
        return (*shlex.split(self.template), *(w.replace("{", "{{").replace("}", "}}") for w in self.extra_args))

    def spec(self, port: int | None) -> ServerSpec:
        gpus = int(self.num_gpus) if self.num_gpus == int(self.num_gpus) else self.num_gpus
        values = {
            "model": self.model,
            "served_model_name": self.served_name,
            "num_gpus": str(max(1, gpus) if isinstance(gpus, int) else 1),
            "python": sys.executable,
        }
        return ServerSpec(self.words(), values, dict(self.env), self.host, port, self.max_restarts, self.stop_timeout_s)


def placements(config: ServersConfig, nodes: list[dict[str, Any]]) -> list[tuple[str | None, int]]:
    """(node id or None for Ray's choice, index of the server on its node) per server, from `ray.nodes()`."""
    if isinstance(config.replicas, int):
        return [(None, i) for i in range(config.replicas)]
    out: list[tuple[str | None, int]] = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        gpus = float(node.get("Resources", {}).get("GPU", 0.0))
        if config.replicas == "per_node":
            count = 1 if gpus >= config.num_gpus else 0
        else:
            count = math.floor(gpus / config.num_gpus + 1e-9)
        out += [(node["NodeID"], i) for i in range(count)]
    return out


@contextlib.contextmanager
def managed_servers(config: ServersConfig, log_dir: str, log: Callable[[str], None]) -> Iterator[list[str]]:
    """Start the servers, wait until they answer, yield their URLs; stop them all on the way out, however the
    way out comes (the stage finished, an exception, KeyboardInterrupt)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    where = placements(config, ray.nodes())
    if not where:
        raise ServersError(f"servers: no node has {config.num_gpus:g} GPUs for a server (replicas: {config.replicas})")
    remote = ray.remote(ServerActor)
    actors: list[Any] = []
    try:
        for index, (node, slot) in enumerate(where):
            strategy = NodeAffinitySchedulingStrategy(node, soft=False) if node else "SPREAD"
            port = None if config.port is None else config.port + (slot if node else index)
            options = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus, "max_concurrency": 4}
            actor = remote.options(**options, scheduling_strategy=strategy, name=None).remote(
                config.spec(port), index, log_dir
            )
            actors.append(actor)
        log(f"starting {len(actors)} {config.engine} servers of {config.model} (logs in {log_dir})")
        urls = _wait_ready(actors, config.startup_timeout_s, log)
        yield urls
    finally:
        _stop(actors, config.stop_timeout_s)


def _wait_ready(actors: list[Any], timeout_s: float, log: Callable[[str], None]) -> list[str]:
    import ray

    pending = {actor.wait_ready.remote(timeout_s): i for i, actor in enumerate(actors)}
    urls: dict[int, str] = {}
    failures: list[str] = []
    started = time.monotonic()
    while pending:
        left = max(1.0, timeout_s + 60 - (time.monotonic() - started))  # the actors time out first, normally
        done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not done:
            failures += [f"server {pending[r]}: no answer from its actor (not scheduled?)" for r in pending]
            break
        ref = done[0]
        index = pending.pop(ref)
        try:
            urls[index] = ray.get(ref)
            log(f"server {index} ready at {urls[index]} ({time.monotonic() - started:.0f} s)")
        except Exception as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), ServerFailed) else e
            failures.append(f"server {index}: {cause}")
    if failures and urls:
        lines = "\n  ".join(failures)
        log(f"{len(failures)} of {len(actors)} servers did not start; going on with {len(urls)}:\n  {lines}")
    if not urls:
        raise ServersError("no server started:\n  " + "\n  ".join(failures))
    return [urls[i] for i in sorted(urls)]


def _stop(actors: list[Any], timeout_s: float) -> None:
    import ray

    if not actors:
        return
    refs = [actor.stop.remote() for actor in actors]
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s + 10)
    for actor in actors:  # whatever did not stop: the actor's death takes its server down (parent-death signal)
        with contextlib.suppress(Exception):
            ray.kill(actor)


def check_served_model(urls: list[str], model: str, field: str, timeout_s: float = 30.0) -> None:
    """Every server answers `/v1/models` and lists ``model``; raises `ServersError` naming ``field`` otherwise."""
    problems = []
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout_s) as response:
                served = served_models(json.loads(response.read()))
        except (OSError, ValueError) as e:
            problems.append(f"{url} does not answer /models: {e}")
            continue
        if model not in served:
            problems.append(f"{field}: {model!r} is not served by {url} (it serves {', '.join(map(repr, served))})")
    if problems:
        raise ServersError("; ".join(problems))


@contextlib.contextmanager
def serving(
    servers: ServersConfig | None, endpoints: list[str], model: str, log_dir: str, log: Callable[[str], None]
) -> Iterator[list[str]]:
    """The URLs a caption stage sends to, for its whole run: the managed servers (started now, stopped on the way
    out) or the user's endpoints, each checked to serve ``model`` first."""
    if servers is None:
        check_served_model(endpoints, model, "client.model")
        yield list(endpoints)
        return
    with managed_servers(servers, log_dir, log) as urls:
        field = "client.model" if model != servers.served_name else "servers.served_model_name"
        check_served_model(urls, model, field)
        yield urls
