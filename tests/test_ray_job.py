"""The documented cluster path: `ray job submit -- curate run ...` against a Ray head (with its dashboard and job
server, the `cluster` extra) that this test starts on 127.0.0.1 with token authentication, as Ray 2.59+ does."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no dashboard on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node started as an operator would (`ray start --head`), stopped by signalling its `--block`
    process, which stops the daemons it started and nothing else on the machine (unlike `ray stop`)."""
    dashboard = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's entrypoint runs `curate` from this install
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={free_port()}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--include-dashboard=true",
                "--num-cpus=2",
                "--disable-usage-stats",
                # the per-node agents' default ports are taken by any other Ray on the machine (the suite's own)
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(dashboard, head)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        # the whole process group at once (head daemons, agents, workers), then whatever is left: a graceful
        # `--block` shutdown stops them one by one, which took half a minute here
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.mark.slow
def test_ray_job_submit_runs_a_pipeline_on_the_cluster(ray_head, sample_images, tmp_path):
    address, env = ray_head
    run = tmp_path / "run"
    project = tmp_path / "project"  # what the user's checkout would hold: the pipeline, uploaded as the working dir
    (project / "pipelines").mkdir(parents=True)
    (project / "pipelines" / "job.yaml").write_text(
        f"name: job\noutput: {run}\nstages:\n  - kind: local\n    name: ingest\n    path: {sample_images}\n"
        "    shard_size: 16\n"
    )
    # as pipelines/laion.yaml and docs/operations.md write it
    submit = [str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir", str(project)]
    submit += ["--", "curate", "run", "pipelines/job.yaml"]
    deadline = time.monotonic() + 120
    while True:  # the job agent registers a little after the dashboard's port opens
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        not_ready = any(s in result.stdout + result.stderr for s in ("Connection refused", "try again later"))
        if result.returncode == 0 or not not_ready or time.monotonic() > deadline:
            break
        time.sleep(2)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "succeeded" in output
    # curate joined the job's cluster through the RAY_ADDRESS that `ray job submit` set, not a Ray of its own
    assert "on Ray cluster at " in output and "embedded local Ray" not in output
    record = json.loads((run / "ingest" / "_SUCCESS.json").read_text())
    assert record["rows"] == 31 and record["shards"] == 2


@pytest.mark.slow
def test_ray_job_submit_without_the_token_is_refused(ray_head, tmp_path):
    address, env = ray_head
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    anonymous["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "none")  # never the operator's ~/.ray/auth_token
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address={address}", "--", "true"],
        env=anonymous,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "authentication" in (result.stdout + result.stderr).lower()
