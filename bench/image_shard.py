"""One ingest shard of a folder of images, written by the runner's own shard function (for the benches)."""

from __future__ import annotations

from pathlib import Path


def write_image_shard(run: Path, images: Path, captions: str = "txt"):
    """Every image of ``images`` in shard 0 of a `local` stage named ingest under ``run``; returns the RunDir."""
    from curate.pipeline import parse_pipeline
    from curate.runfolder import RunDir
    from curate.runner import StageJob, execute_shard, prepare_stage
    from curate.stages.spec import WorkContext

    pipeline = parse_pipeline(
        f"name: bench\noutput: {run}\nstages:\n  - kind: local\n    name: ingest\n    path: {images}\n"
        f"    shard_size: 100000\n    captions: {captions}\n"
    )
    stage = pipeline.stage("ingest")
    rundir = RunDir(str(run))
    _, tasks = prepare_stage(pipeline, rundir, stage)
    assert execute_shard(StageJob("local", stage, WorkContext(str(run), "ingest", None)), tasks[0], None)["ok"]
    return rundir
