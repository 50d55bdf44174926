"""One run per run folder on a local disk: a second run and a --redo refused while the lease is held, a lease
taken over after its TTL (and its hung holder stopping when it wakes), a killed local holder's lease free at once,
and the settings checked before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate import lease
from curate.config import ConfigError
from curate.inspect import lease_line
from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline

PIPELINE = """\
name: lease-test
output: {out}
stages:
  - {{kind: local, name: ingest, path: {images}, shard_size: 10}}
  - {{kind: filter, name: prefilter, min_side: 64}}
"""

# A holder in its own process: takes the lease, says so, then sleeps until the lease is lost or it is killed.
HOLDER = """
import sys, time
from curate import lease
with lease.holding(sys.argv[1], float(sys.argv[2]), float(sys.argv[2]) / 4, log=print):
    print("held", flush=True)
    time.sleep(300)
"""


def _holder(folder: Path, ttl: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(ttl)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held", process.stderr
    return process


def _quiet(line: str) -> None:
    pass


def test_second_run_and_redo_refused_while_a_run_holds_the_folder(ray_cluster, sample_images, tmp_path):
    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(out=run, images=sample_images))
    run_pipeline(parse_pipeline(path.read_text()), log=_quiet)
    assert "lease: free" in lease_line(str(run)), "the lease was not released at the end of the run"

    held = lease.acquire(str(run), ttl_seconds=30, renew_seconds=0.25, log=_quiet)
    try:
        shown = lease_line(str(run))
        assert f"lease: held: host {os.uname().nodename}, pid {os.getpid()}" in shown
        refused = [
            subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(path), *extra, "--address", ray_cluster],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in ([], ["--redo", "ingest"])
        ]  # fmt: skip
        for process in refused:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 1, err
            assert (
                f"run folder {run} is in use by another curate run: host {os.uname().nodename}, pid {os.getpid()}"
                in err
            )
            assert "since 20" in err and "last renewed" in err and "--take-over" in err, err
        assert (run / "ingest" / "_SUCCESS.json").exists(), "the refused --redo removed the stage"

        taken: list[str] = []
        thief = lease.acquire(str(run), take_over=True, log=taken.append)
        assert "because --take-over was given" in taken[0]
        deadline = time.monotonic() + 10
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.lost is not None and "taken over" in held.lost, "the old holder did not notice"
        thief.release()
    finally:
        held.release()
    assert not (run / "_lease.json").exists()


def test_stale_lease_taken_over_after_its_ttl_and_the_hung_holder_stops(tmp_path):
    holder = _holder(tmp_path, ttl=3.0)
    try:
        os.kill(holder.pid, signal.SIGSTOP)  # hung: alive, not renewing
        with pytest.raises(lease.LeaseHeld, match=f"pid {holder.pid} .*expires \\(in [0-9]+ s\\)"):
            lease.acquire(str(tmp_path), log=_quiet)
        while not lease.read_lease(str(tmp_path)).expired:
            time.sleep(0.05)
        said: list[str] = []
        mine = lease.acquire(str(tmp_path), log=said.append)
        assert f"from host {os.uname().nodename}, pid {holder.pid}" in said[0]
        assert "past its TTL: that run stopped renewing" in said[0]
        os.kill(holder.pid, signal.SIGCONT)  # it wakes, fails to renew, and stops
        _, err = holder.communicate(timeout=30)
        assert holder.returncode != 0
        assert "LeaseLost: this run lost its lease" in err and "the lease was taken over" in err, err
        assert lease.read_lease(str(tmp_path)).body["holder"] == mine.body["holder"], "the old holder wrote over it"
        mine.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_killed_local_holder_is_taken_over_at_once(tmp_path):
    holder = _holder(tmp_path, ttl=600.0)
    holder.kill()
    holder.wait()
    said: list[str] = []
    lease.acquire(str(tmp_path), log=said.append).release()
    assert "its process no longer exists on this machine" in said[0]


def test_lease_and_storage_settings_are_checked_before_work(tmp_path):
    base = PIPELINE.format(out=tmp_path / "run", images=tmp_path)
    with pytest.raises(ConfigError) as error:
        parse_pipeline("lease: {ttl_seconds: 10, renew_seconds: 6}\n" + base, "p.yaml")
    assert "p.yaml:1: lease.renew_seconds: Value error, must be at most half of ttl_seconds (10)" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_pipeline("storage: {endpoint_url: 'minio:9000', env: [CURATE_NOT_SET_ANYWHERE]}\n" + base, "p.yaml")
    assert "p.yaml:1: storage.endpoint_url:" in str(error.value)
    assert "storage.env: Value error, not set in this environment: CURATE_NOT_SET_ANYWHERE" in str(error.value)
    pipeline = parse_pipeline("lease: {ttl_seconds: 120, renew_seconds: 30}\n" + base, "p.yaml")
    assert "lease:\n  ttl_seconds: 120.0\n  renew_seconds: 30.0" in pipeline.to_yaml()
