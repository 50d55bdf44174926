"""One inference server on this node: its command started under `curate.caption.launch`, watched, restarted a
bounded number of times, probed for readiness, logged into the run folder, and stopped with its whole process
group. `ServerActor` is the same thing as a Ray actor, which holds the server's GPUs (Ray sets
CUDA_VISIBLE_DEVICES for it, and the server inherits it).

Files, under the stage's `_servers/` folder of the run: `server-NN.log` (the server's stdout and stderr, every
start appended) and `server-NN.json` (url, node, pids, state, starts, exit codes, restarts), rewritten at every
change of state. When the run folder is not on this machine's filesystem (an object store), the log is written
to a local file and copied there at every change of state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from curate import storage

LOG_COPY_BYTES = 8 * 2**20  # the tail of a log copied to an object store
PROBE_EVERY_S = 0.25


class ServerFailed(Exception):
    """A server that could not be started, or died more often than its restarts allow."""


@dataclass(frozen=True)
class ServerSpec:
    """What one server runs and how it is looked after: plain data, sent to the actor."""

    command: tuple[str, ...]  # the template's words, placeholders not yet filled
    values: dict[str, str]  # placeholder -> value, except port and host (filled here)
    env: dict[str, str] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int | None = None  # None: a free port of the node
    max_restarts: int = 3
    stop_timeout_s: float = 30.0


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "0.0.0.0", "::") else "", 0))
        return int(s.getsockname()[1])


def ray_node() -> str | None:
    """The Ray node this runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ServerProcess:
    def __init__(self, spec: ServerSpec, index: int, log_dir: str):
        self.spec = spec
        self.index = index
        self.port = spec.port or free_port(spec.host)
        local = spec.host in ("", "0.0.0.0", "::")
        self.url = f"http://{node_ip() if local else spec.host}:{self.port}/v1"
        self.probe_url = f"http://{'127.0.0.1' if local else spec.host}:{self.port}/v1/models"
        values = {**spec.values, "port": str(self.port), "host": spec.host or "0.0.0.0"}
        self.command = [word.format(**values) for word in spec.command]
        name = f"server-{index:02d}"
        self.status_uri = storage.join(log_dir, name + ".json")
        self.log_uri = storage.join(log_dir, name + ".log")
        _, path = storage.resolve(self.log_uri)
        self.remote_log = not storage.is_local(log_dir)
        if self.remote_log:
            path = os.path.join(tempfile.mkdtemp(prefix="curate-server-"), name + ".log")
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.log_path = path
        self.state = "starting"
        self.restarts = 0
        self.starts: list[str] = []
        self.exit_codes: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.finished = threading.Event()  # failed for good, or stopped
        self.stopping = False
        self.lock = threading.Lock()
        # every start from this one long-lived thread: the launcher's parent-death signal follows its parent thread
        self.thread = threading.Thread(target=self._supervise, name=f"curate-{name}", daemon=True)
        self.thread.start()

    # -- lifecycle -------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while True:
            with self.lock:
                if self.stopping:
                    break
                self.proc = self._start()
            self._set("starting")
            threading.Thread(target=self._watch_ready, args=(self.proc,), daemon=True).start()
            code = self.proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # what a killed launcher could not take down with it
            self.ready.clear()
            self.exit_codes.append(code)
            if self.stopping:
                break
            if self.restarts >= self.spec.max_restarts:
                self._set("failed")
                self.finished.set()
                return
            self.restarts += 1
            self._set("restarting")
            time.sleep(min(30.0, 0.5 * 2 ** (self.restarts - 1)))
        self._set("stopped")
        self.finished.set()

    def _start(self) -> subprocess.Popen:
        self.starts.append(_now())
        launcher = [sys.executable, "-m", "curate.caption.launch", "--parent", str(os.getpid())]
        launcher += ["--grace-s", str(self.spec.stop_timeout_s), "--", *self.command]
        with open(self.log_path, "ab") as log:
            header = f"\n=== curate: start {len(self.starts)} at {self.starts[-1]}: {' '.join(self.command)}\n"
            log.write(header.encode())
            log.flush()
            return subprocess.Popen(
                launcher,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.spec.env},
                start_new_session=True,  # its own process group: stopped as one
            )

    def _watch_ready(self, proc: subprocess.Popen) -> None:
        """Probe `/v1/models` until the server answers (or this start of it ends)."""
        while proc.poll() is None and not self.stopping:
            try:
                with urllib.request.urlopen(self.probe_url, timeout=5) as response:
                    if response.status == 200:
                        self.ready.set()
                        self._set("ready")
                        return
            except (OSError, ValueError):
                pass
            time.sleep(PROBE_EVERY_S)

    def wait_ready(self, timeout_s: float) -> str:
        """The server's URL once it answers; raises when it fails for good or takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.finished.is_set():
                raise ServerFailed(f"{self.url}: {self.describe()}; see {self.log_uri}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.url}: not answering after {timeout_s:.0f} s; see {self.log_uri}")
        return self.url

    def stop(self) -> dict[str, Any]:
        """Stop the server and everything it started (SIGTERM to its group, SIGKILL after the grace period)."""
        with self.lock:
            self.stopping = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.spec.stop_timeout_s + 5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.finished.wait(10)
        return self.status()

    # -- records ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        codes = ", ".join(map(str, self.exit_codes)) or "none"
        starts = len(self.starts)
        return f"{self.state} after {starts} starts (exit codes {codes}; max_restarts {self.spec.max_restarts})"

    def status(self) -> dict[str, Any]:
        return {
            "server": self.index,
            "url": self.url,
            "state": self.state,
            "restarts": self.restarts,
            "starts": self.starts,
            "exit_codes": self.exit_codes,
            "launcher_pid": self.proc.pid if self.proc else None,
            "node": node_ip(),
            "ray_node": ray_node(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # what Ray gave the actor, and the server inherits
            "command": self.command,
            "log": self.log_uri,
            "updated_at": _now(),
        }

    def _set(self, state: str) -> None:
        self.state = state
        with contextlib.suppress(Exception):  # a record that cannot be written must not stop the server
            storage.write_json(self.status_uri, self.status())
            if self.remote_log:
                with open(self.log_path, "rb") as log:
                    log.seek(max(0, os.path.getsize(self.log_path) - LOG_COPY_BYTES))
                    storage.write_atomic(self.log_uri, log.read())


class ServerActor:
    """`ServerProcess` in a Ray actor that reserves the server's GPUs and CPUs (threaded, so `stop` and `status`
    answer while `wait_ready` waits)."""

    def __init__(self, spec: ServerSpec, index: int, log_dir: str):
        self.server = ServerProcess(spec, index, log_dir)

    def wait_ready(self, timeout_s: float) -> str:
        return self.server.wait_ready(timeout_s)

    def status(self) -> dict[str, Any]:
        return self.server.status()

    def stop(self) -> dict[str, Any]:
        return self.server.stop()
