"""The run folder on an S3 API server (moto's, on 127.0.0.1): the demo pipeline killed mid-stage and resumed, no
temporary object left behind, and the lease doing its work there (refusals, take-over after the TTL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from curate import lease, serve, storage
from curate.inspect import lease_line
from curate.pipeline import load_pipeline
from curate.runfolder import RunDir
from curate.runner import RunError, run_pipeline
from curate.verify import check_shards

pytest_plugins = ["s3_server"]  # fixture: s3_server

STAGES = "ingest,prefilter"  # the demo's front stages: a download from `curate serve`, a 1:1 filter
TTL = 4.0  # seconds; the running driver renews every TTL/4


@pytest.fixture
def demo_folder(tmp_path, sample_images, tiny_models, s3_server) -> Iterator[Path]:
    """A working directory laid out as the README's demo has it, with the demo pipeline plus a `storage:` block
    that hands the endpoint and credentials to every Ray worker, and the images served as `curate serve` serves
    them (its server and URL list, in this process: one interpreter start fewer per run)."""
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "images").symlink_to(sample_images)
    (tmp_path / "demo-data" / "models").symlink_to(tiny_models)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "pipelines").mkdir()
    text = (REPO / "pipelines" / "demo.yaml").read_text()
    storage_block = (
        f"storage:\n  endpoint_url: {s3_server.endpoint}\n  env: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]\n"
    )
    (tmp_path / "pipelines" / "demo.yaml").write_text(text.replace("\nray:\n", f"\n{storage_block}\nray:\n", 1))
    server = serve.start(sample_images)
    serve.write_url_list(sample_images, f"http://127.0.0.1:{server.server_address[1]}", demo_urls(tmp_path))
    try:
        yield tmp_path
    finally:
        server.shutdown()
        server.server_close()


def demo_urls(folder: Path) -> Path:
    return folder / "demo-data" / "urls.parquet"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def _run_command(output: str, address: str) -> list[str]:
    run = ["run", "pipelines/demo.yaml", "--output", output, "--stages", STAGES, "--address", address]
    return _cli(*run, "--lease-ttl", str(TTL))


def _env(s3_server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **s3_server.env, "PYTHONUNBUFFERED": "1"}


def _wait(condition, what: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # every poll lists objects on the same server the run writes to


def _mid_stage(run: RunDir) -> str | None:
    """A stage of the run with some shards done and not all, if there is one now."""
    for name in STAGES.split(","):
        stage = run.stage(name)
        if storage.exists(stage.record_uri) and not stage.is_complete():
            done = len(stage.done_shards())
            if 0 < done < stage.read_record()["shards"]:
                return name
    return None


@pytest.mark.slow
def test_demo_on_s3_refused_taken_over_after_ttl_killed_and_resumed(ray_cluster, demo_folder, s3_server, monkeypatch):
    bucket = s3_server.new_bucket()
    output = f"s3://{bucket}/demo"
    run = RunDir(output)
    env = _env(s3_server)
    first = subprocess.Popen(
        _run_command(output, ray_cluster), cwd=demo_folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait(lambda: lease.read_lease(output) is not None, "the first run's lease", process=first)
        holder = lease.read_lease(output)
        driver = holder.body["pid"]
        # while it runs: a second run and a --redo are refused at once, naming the holder (in this process, to
        # save two interpreter starts: tests/test_lease.py runs the same refusals through the CLI)
        monkeypatch.chdir(demo_folder)
        pipeline = load_pipeline("pipelines/demo.yaml")
        for extra in ({"only": STAGES.split(",")}, {"redo": ["ingest"]}):
            with pytest.raises(RunError) as refused:
                run_pipeline(pipeline, output, address=ray_cluster, log=lambda line: None, **extra)
            assert f"is in use by another curate run: host {holder.body['host']}, pid {driver}" in str(refused.value)
            assert "--take-over" in str(refused.value)
        assert first.poll() is None, "the run ended before the refused runs were tried; give it more work"

        # mid-stage, the driver hangs (alive, no longer renewing); past the TTL it is killed outright
        _wait(lambda: _mid_stage(run) is not None, "a stage in progress", process=first)
        os.kill(driver, signal.SIGSTOP)
        stopped = _mid_stage(run)
        assert stopped is not None, "the stage finished as the driver was stopped"
        _wait(lambda: lease.read_lease(output).expired, "the lease to expire", timeout=TTL * 4)
        os.kill(driver, signal.SIGKILL)
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert storage.exists(run.stage("ingest").uri), "the refused --redo removed the stage"

    command = _run_command(output, ray_cluster)
    resumed = subprocess.run(command, cwd=demo_folder, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the run folder {output} from host" in resumed.stderr
    assert "past its TTL" in resumed.stderr
    assert f"[{stopped}] resuming:" in resumed.stderr

    keys = s3_server.keys(bucket)
    assert not [k for k in keys if "/.tmp-" in k], "temporary objects left behind"
    assert "demo/_lease.json" not in keys, "the lease was not released"
    ingest = storage.read_parquet(run.stage("ingest").shard_uris()[0])  # shards read back through pyarrow's S3
    assert ingest.num_rows > 0
    urls = storage.read_parquet(str(demo_urls(demo_folder)))
    rows = {name: sum(s.rows for s in run.stage(name).shard_stats()) for name in STAGES.split(",")}
    assert rows == dict.fromkeys(rows, urls.num_rows), rows  # every URL exactly once in every stage
    for name in STAGES.split(","):
        assert run.stage(name).is_complete()

    # what `curate verify`'s tasks do, over S3 (the CLI's own path is tested on a local run, tests/test_verify.py)
    for name, upstream in (("ingest", None), ("prefilter", run.stage("ingest").uri)):
        done = sorted(run.stage(name).done_shards())
        checked = check_shards(run.stage(name).uri, upstream, done)
        assert checked["problems"] == [] and checked["checked"] == len(done) > 0 and checked["unchecked"] == 0
    assert "lease: free" in lease_line(output)
    log = [json.loads(line) for line in storage.read_text(run.log_uri).splitlines()]
    assert log[-1]["completed"] == STAGES.split(",")


def test_lease_protocols_on_the_s3_server(s3_server):
    """The conditional-write lease, and the best-effort one a store without conditional writes gets."""
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/run"
    backend = lease.backend_for(uri, probe=True)
    assert isinstance(backend, lease.S3Backend), "moto honours If-None-Match; the probe should say so"
    held = lease.acquire(uri, ttl_seconds=30, renew_seconds=0.2, log=lambda line: None)
    try:
        with pytest.raises(lease.LeaseHeld, match=f"pid {os.getpid()}"):
            lease.acquire(uri, log=lambda line: None)
        time.sleep(0.5)
        assert lease.read_lease(uri).body["sequence"] >= 1, "not renewed"
        taken = []
        thief = lease.acquire(uri, take_over=True, log=taken.append)
        assert "because --take-over was given" in taken[0]
        _wait(lambda: held.lost is not None, "the first holder to see it lost", timeout=10)
        assert "taken over" in held.lost
        thief.release()
        assert lease.read_lease(uri) is None
    finally:
        held.release()

    # best effort: the same refusals, with a settle time instead of atomic writes
    first = lease.BestEffortBackend(f"{uri}/best/_lease.json", settle=0.1)
    body = {"holder": "a", "sequence": 0}
    version = first.create(body)
    assert version == ("a", 0)
    assert first.create({"holder": "b", "sequence": 0}) is None
    assert first.replace({"holder": "b", "sequence": 0}, ("x", 9)) is None
    assert first.replace({"holder": "b", "sequence": 0}, version) == ("b", 0)
    assert first.delete(version) is False and first.delete(("b", 0)) is True
