"""Runs resume exactly, run only what --stages names, refuse changed settings, and can be inspected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import curate_cli
from PIL import Image

from curate.inspect import read_stage, run_summary

PIPELINE = """\
name: resume-test
output: {out}
stages:
  - kind: local
    name: ingest
    path: {images}
    shard_size: {shard_size}
    resources: {{num_cpus: 1, concurrency: 1}}
"""


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """Enough real files (noise PNGs of several sizes, and a few broken ones) for a run that takes a while."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(7)
    for i in range(160):
        size = (int(rng.integers(64, 320)), int(rng.integers(64, 320)))
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), np.uint8)).save(folder / f"img-{i:03d}.png")
        (folder / f"img-{i:03d}.txt").write_text(f"noise picture number {i}")
    for i in range(5):
        (folder / f"broken-{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def write_pipeline(tmp_path: Path, name: str, images: Path, shard_size: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / name, images=images, shard_size=shard_size))
    return path


def rows_of(run: Path) -> list[tuple[str, str, str]]:
    table = read_stage(str(run), "ingest")
    return sorted(zip(table["key"].to_pylist(), table["status"].to_pylist(), table["sha256"].to_pylist(), strict=True))


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(ray_cluster, many_images, tmp_path):
    reference = write_pipeline(tmp_path, "reference", many_images)
    assert curate_cli("run", str(reference), "--address", ray_cluster).returncode == 0

    pipeline = write_pipeline(tmp_path, "killed", many_images)
    run = tmp_path / "killed"
    markers = run / "ingest" / "_shards"
    process = subprocess.Popen(
        [sys.executable, "-m", "curate.cli", "run", str(pipeline), "--address", ray_cluster],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not markers.is_dir() or len(os.listdir(markers)) < 3):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(os.listdir(markers))
    planned = -(-165 // 2)
    assert 3 <= done_at_kill < planned, "the run finished before it could be killed; give it more work"
    assert not (run / "ingest" / "_SUCCESS.json").exists()

    # The crash can also land between a shard's rename and its marker, or leave a temporary file.
    done = sorted(markers.iterdir())
    done[0].unlink()
    (run / "ingest" / ".tmp-deadbeef-shard-00099.parquet").write_bytes(b"partial")

    result = curate_cli("run", str(pipeline), "--address", ray_cluster)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {done_at_kill - 1} of {planned} shards already done" in result.stderr
    assert rows_of(run) == rows_of(tmp_path / "reference")
    keys = [k for k, _, _ in rows_of(run)]
    assert len(keys) == len(set(keys)) == 165
    assert not list((run / "ingest").glob(".tmp-*"))
    assert len(list((run / "ingest").glob("shard-*.parquet"))) == planned

    again = curate_cli("run", str(pipeline), "--address", ray_cluster)
    assert again.returncode == 0 and "complete already; skipped" in again.stderr


def test_stages_flag_runs_only_what_it_names(ray_cluster, sample_images, many_images, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(
        f"""\
name: two
output: {tmp_path / "run"}
stages:
  - {{kind: local, name: photos, path: {sample_images}, shard_size: 10}}
  - {{kind: local, name: noise, path: {many_images}, shard_size: 50}}
"""
    )
    result = curate_cli("run", str(path), "--stages", "noise", "--address", ray_cluster)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "noise" / "_SUCCESS.json").exists()
    assert not (tmp_path / "run" / "photos").exists()
    assert "[photos]" not in result.stderr and "[noise] complete" in result.stderr

    bad = curate_cli("run", str(path), "--stages", "noise,typo", "--address", ray_cluster)
    assert bad.returncode == 1 and "no stage named 'typo' (stages: photos, noise)" in bad.stderr


def test_changed_settings_are_refused_on_resume(ray_cluster, sample_images, tmp_path):
    path = write_pipeline(tmp_path, "run", sample_images, shard_size=10)
    assert curate_cli("run", str(path), "--address", ray_cluster).returncode == 0
    path.write_text(path.read_text().replace("shard_size: 10", "shard_size: 3"))
    result = curate_cli("run", str(path), "--address", ray_cluster)
    assert result.returncode == 1
    assert "stage 'ingest'" in result.stderr and "different settings" in result.stderr
    # resources may change between runs: they do not change what a stage produces
    path.write_text(
        path.read_text().replace("shard_size: 3", "shard_size: 10").replace("concurrency: 1", "concurrency: 2")
    )
    assert curate_cli("run", str(path), "--address", ray_cluster).returncode == 0


def test_run_folder_records_and_inspect(ray_cluster, sample_images, tmp_path):
    path = write_pipeline(tmp_path, "run", sample_images, shard_size=10)
    result = curate_cli("run", str(path), "--address", ray_cluster)
    assert result.returncode == 0
    assert "[ingest] shards 4/4  rows 31/31" in result.stderr  # progress: shards, rows done / total, rate

    run = tmp_path / "run"
    saved = yaml.safe_load((run / "pipeline.yaml").read_text())
    assert saved["stages"][0]["path"] == str(sample_images) and saved["stages"][0]["shard_size"] == 10
    (entry,) = [yaml.safe_load(line) for line in (run / "runs.jsonl").read_text().splitlines()]
    assert entry["completed"] == ["ingest"]

    (summary,) = run_summary(str(run))
    assert summary["state"] == "complete" and summary["rows"] == 31
    assert summary["status"] == {"ok": 28, "empty_file": 1, "truncated": 1, "decode_error": 1}

    shown = curate_cli("inspect", str(run), "--rows", "2")
    assert shown.returncode == 0
    text = shown.stdout
    assert "ingest" in text and "complete" in text and "4/4" in text
    assert "ok 28 (90.3%)" in text and "truncated 1 (3.2%)" in text
    assert "image                binary" in text and "row 1:" in text and "bytes>" in text

    shard = curate_cli("inspect", str(run / "ingest" / "shard-00000.parquet"))
    assert shard.returncode == 0 and "rows 10 in 1 row groups" in shard.stdout
    assert "curate.stage=ingest" in shard.stdout

    missing = curate_cli("inspect", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "no such run folder or shard" in missing.stderr


def test_a_failing_shard_is_reported_and_redone_alone(ray_cluster, sample_images, tmp_path):
    """A shard whose write fails does not stop the others; the command exits 1; a re-run redoes only it."""
    path = write_pipeline(tmp_path, "run", sample_images, shard_size=10)
    blocker = tmp_path / "run" / "ingest" / "shard-00001.parquet"
    blocker.mkdir(parents=True)  # a directory where the shard must go: its rename fails
    (blocker / "x").write_text("in the way")
    result = curate_cli("run", str(path), "--address", ray_cluster)
    assert result.returncode == 1
    assert "1 of 4 shards failed" in result.stderr and "First failure, shard 1" in result.stderr
    markers = sorted(p.name for p in (tmp_path / "run" / "ingest" / "_shards").iterdir())
    assert markers == ["shard-00000.json", "shard-00002.json", "shard-00003.json"]
    before = {m: (tmp_path / "run" / "ingest" / "_shards" / m).stat().st_mtime_ns for m in markers}

    (blocker / "x").unlink()
    blocker.rmdir()
    result = curate_cli("run", str(path), "--address", ray_cluster)
    assert result.returncode == 0, result.stderr
    assert "resuming: 3 of 4 shards already done" in result.stderr
    after = {m: (tmp_path / "run" / "ingest" / "_shards" / m).stat().st_mtime_ns for m in markers}
    assert after == before  # finished shards were not redone
    assert len(rows_of(tmp_path / "run")) == 31
