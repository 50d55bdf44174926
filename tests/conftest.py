"""Shared fixtures: one local Ray per test session, real sample images, pipeline helpers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One torch thread in the test process. On two cores any other busy process (a Ray worker, the suite's
    own subprocesses) makes a two-thread OpenMP pool wait on its slower thread at every op: the overfit test
    took 21 s with two threads and 7 s with one, at a load of one other process. Ray workers keep their own
    setting (OMP_NUM_THREADS from each task's num_cpus)."""
    import torch

    torch.set_num_threads(1)
    # The run report (RUN/_report/index.html) is built by the demo run and tests/test_report.py; the suite's many
    # small pipelines, whose reports nobody reads, skip it (about 2 s per `curate run` subprocess otherwise).
    os.environ.setdefault("CURATE_REPORT", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the whole session; its address lets CLI subprocesses join it with --address."""
    import ray

    from curate.cluster import quiet_ray_data

    # address="local": a new instance, never a cluster that `ray start` left on this machine
    context = ray.init(
        address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False
    )
    quiet_ray_data()
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """The real sample set `curate samples` writes (good, odd-mode and broken files)."""
    from curate.samples import write_samples

    folder = tmp_path_factory.mktemp("samples") / "images"
    write_samples(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The demo's model folder as `curate tiny-models` writes it (captioner, SD3 encoders and VAE)."""
    from curate.testing.tiny_models import build_tiny_models

    folder = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(folder)
    return folder


@pytest.fixture
def images_copy(sample_images, tmp_path) -> Path:
    """A private copy of the samples that a test may change."""
    target = tmp_path / "images"
    shutil.copytree(sample_images, target)
    return target


def curate_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `curate` command in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", "curate.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def readme_command(heading_words: str) -> str:
    """The first ```bash block after the paragraph that mentions ``heading_words``."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading_words)
    return re.search(r"```bash\n(.+?)\n```", text[start:], re.S).group(1).strip()


def fresh_clone(target: Path) -> Path:
    """The files a clone of the current work would have: tracked and not-ignored, nothing built or run."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's offline demo command, run once per session on a fresh clone (the slow end-to-end run that
    several tests read: the README test, the run report). Returns the clone and the finished command."""
    command = readme_command("Run the offline demo")
    setup = "bash .ci/setup && "
    assert command.startswith(setup)
    # .ci/setup made the environment this test runs in; the rest runs as written, with that environment.
    command = command[len(setup) :].replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    clone = fresh_clone(tmp_path_factory.mktemp("demo") / "clone")
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=900,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "CURATE_REPORT": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return clone, result
