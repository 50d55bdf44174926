"""Shared fixtures: one local Ray per test session, real sample images, pipeline helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the whole session; its address lets CLI subprocesses join it with --address."""
    import ray

    from curate.cluster import quiet_ray_data

    context = ray.init(
        address="local",  # not a cluster another process started with `ray start` on this machine
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
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
