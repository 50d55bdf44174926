"""Connect to Ray: an existing cluster when an address is given, otherwise an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from curate.config import RayConfig


def quiet_ray_data() -> None:
    """Our own per-stage progress lines replace Ray Data's progress bars and execution banners."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def resolve_address(cli_address: str | None, config: RayConfig) -> str | None:
    """--address, then RAY_ADDRESS (what `ray job submit` sets), then the pipeline's ray.address."""
    return cli_address or os.environ.get("RAY_ADDRESS") or config.address


@contextlib.contextmanager
def ray_session(address: str | None, config: RayConfig, env_vars: dict[str, str] | None = None) -> Iterator[str]:
    """Yield a description of the cluster in use; shut Ray down afterwards only if we started it here.
    ``env_vars`` reach every worker of the job (a pipeline's `storage:` endpoint and credentials)."""
    import ray

    runtime_env = {"env_vars": env_vars} if env_vars else None
    if ray.is_initialized():
        quiet_ray_data()
        yield "the Ray instance already running in this process"
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, runtime_env=runtime_env)
        where = f"Ray cluster at {address}"
    else:
        ray.init(
            address="local",  # a new instance even when another Ray runs on this machine (`ray start`, tests)
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            object_store_memory=config.object_store_memory,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
        where = "embedded local Ray"
    quiet_ray_data()
    try:
        yield where
    finally:
        ray.shutdown()
