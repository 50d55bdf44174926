"""The `curate` command: run, check, inspect, report, verify, samples, serve, tiny-models, train, sample."""

from __future__ import annotations

import argparse
import sys

from curate.config import ConfigError, Pipeline
from curate.pipeline import load_pipeline


def _stages(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _run(args: argparse.Namespace) -> int:
    from curate.interrupt import Interrupted
    from curate.runner import RunError, run_pipeline

    pipeline = _with_lease_ttl(load_pipeline(args.pipeline), args.lease_ttl)
    try:
        run_pipeline(
            pipeline,
            output=args.output,
            only=_stages(args.stages),
            address=args.address,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            redo=_stages(args.redo),
            take_over=args.take_over,
        )
    except RunError as e:
        print(f"curate run: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if e.signum is None:  # the stall watchdog
            print(f"curate run: {e.reason}", file=sys.stderr)
        else:
            print(
                f"curate run: stopped by {e.signal_name} during {e.where or 'the run'}; run the same command again "
                f"to resume",
                file=sys.stderr,
            )
        return e.exit_code
    return 0


def _with_lease_ttl(pipeline: Pipeline, ttl: float | None) -> Pipeline:
    """--lease-ttl replaces the pipeline's `lease:` block (renewing four times per TTL)."""
    if ttl is None:
        return pipeline
    import dataclasses

    from curate.config import LeaseConfig

    return dataclasses.replace(pipeline, lease=LeaseConfig(ttl_seconds=ttl, renew_seconds=ttl / 4))


def _verify(args: argparse.Namespace) -> int:
    from curate import storage
    from curate.cluster import ray_session, resolve_address
    from curate.lease import describe, read_lease
    from curate.runfolder import RunDir
    from curate.runner import RunError, run_pipeline
    from curate.verify import describe_plan, load_run_pipeline, repair_plan, verify_stages

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run = RunDir(storage.absolute(args.run))
    try:
        pipeline = load_run_pipeline(run.uri)
    except FileNotFoundError as e:
        print(f"curate verify: {e}", file=sys.stderr)
        return 1
    names = _stages(args.stages)
    unknown = [n for n in names or () if n not in {s.stage_name for s in pipeline.stages}]
    if unknown:
        print(f"curate verify: --stages: no stage named {', '.join(map(repr, unknown))}", file=sys.stderr)
        return 1
    held = read_lease(run.uri)
    if held is not None and not held.expired:
        log(f"note: a run holds this folder's lease ({describe(held)}); shards it writes now may show up below")
    env = pipeline.storage.environment()
    storage.use_environment(env)
    with ray_session(resolve_address(args.address, pipeline.ray), pipeline.ray, env):
        problems = [p for check in verify_stages(pipeline, run.uri, names, log) for p in check.problems or ()]
        for problem in problems:
            print(problem.line())
        if not problems:
            print(f"{run.uri}: every finished shard matches its marker and its upstream")
            return 0
        damaged: dict[str, set[int]] = {}
        for problem in problems:
            damaged.setdefault(problem.stage, set()).add(problem.shard)
        plan = repair_plan(pipeline, run, damaged)
        if not args.repair:
            print(f"{len(problems)} problems; `curate verify {args.run} --repair` redoes: {describe_plan(plan)}")
            return 1
        try:
            run_pipeline(pipeline, run.uri, list(plan), args.address, log, take_over=args.take_over, repair=damaged)
        except RunError as e:
            print(f"curate verify: the repair failed: {e}", file=sys.stderr)
            return 1
        left = [p for check in verify_stages(pipeline, run.uri, list(plan), log) for p in check.problems or ()]
        for problem in left:
            print(f"still wrong after the repair: {problem.line()}")
        if left:
            return 1
        print(f"repaired: {describe_plan(plan)}; every shard of those stages now matches its marker")
    return 0


def _check(args: argparse.Namespace) -> int:
    from curate import storage
    from curate.check import describe, read_cluster
    from curate.runfolder import RunDir
    from curate.runner import RunError, redo_stages, select_stages

    pipeline = load_pipeline(args.pipeline)
    try:
        run = RunDir(storage.absolute(args.output or pipeline.output))
        selected = select_stages(pipeline, _stages(args.stages), run, _stages(args.redo))
        redone = [s.stage_name for s in redo_stages(pipeline, _stages(args.redo))]
        cluster, problems = read_cluster(pipeline, selected, run, args.address)  # only with --address
    except RunError as e:
        print(f"curate check: {e}", file=sys.stderr)
        return 1
    print(describe(pipeline, args.output, args.address, cluster))
    if redone:
        print(f"--redo would remove and run again: {', '.join(redone)}")
    if problems:
        print("does not fit the cluster; `curate run` would stop before these stages:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from curate import storage
    from curate.inspect import format_any

    if not storage.exists(args.target):
        print(f"curate inspect: no such run folder or shard: {args.target}", file=sys.stderr)
        return 1
    print(format_any(args.target, sample=args.rows))
    return 0


def _report(args: argparse.Namespace) -> int:
    from curate import storage
    from curate.report import build_report

    if not storage.is_dir(storage.absolute(args.run)):
        print(f"curate report: no run folder at {args.run}", file=sys.stderr)
        return 1
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    print(build_report(args.run, log=log, decode_latents=args.decode_latents))
    return 0


def _samples(args: argparse.Namespace) -> int:
    from curate.samples import write_samples

    files = write_samples(args.folder, broken=not args.no_broken, duplicates=not args.no_duplicates)
    print(f"wrote {len(files)} image files (and their captions) to {args.folder}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from curate.serve import serve_during

    command = args.serve_command
    if not command:
        print("curate serve: give the command to run after --, e.g. -- curate run pipelines/demo.yaml", file=sys.stderr)
        return 2
    try:
        return serve_during(
            args.folder,
            args.url_list,
            command,
            port=args.port,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"curate serve: {e}", file=sys.stderr)
        return 2


def _tiny_models(args: argparse.Namespace) -> int:
    from curate.testing.tiny_models import build_tiny_models

    for role, path in build_tiny_models(args.folder).items():
        print(f"{role:<10} {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from curate.train.commands import train_command
    from curate.train.distributed import TrainingFailed

    try:
        return train_command(
            args.config, address=args.address, log=lambda line: print(line, file=sys.stderr, flush=True)
        )
    except TrainingFailed as e:
        print(f"curate train: {e}", file=sys.stderr)
        return 1


def _size(value: str) -> tuple[int, int]:
    width, _, height = value.partition("x")
    return int(height or width), int(width)


def _sample(args: argparse.Namespace) -> int:
    from curate.train.commands import sample_command

    paths = sample_command(
        args.checkpoint,
        args.prompt,
        args.negative_prompt,
        run=args.run,
        output=args.out,
        size=_size(args.size),
        steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        seed=args.seed,
        ema=not args.no_ema,
    )
    print("\n".join(paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume a pipeline")
    run.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/demo.yaml")
    run.add_argument(
        "--output", help="run folder (local path or s3://, gs://, file:// URI); default: the pipeline's output"
    )
    run.add_argument(
        "--address",
        help="Ray cluster address; default: RAY_ADDRESS, then the pipeline's ray.address, else an embedded local Ray",
    )
    run.add_argument("--stages", help="comma-separated stage names to run (default: all)")
    run.add_argument(
        "--redo",
        help="comma-separated stages to do again from scratch (e.g. a filter with new thresholds): removes them "
        "and every later stage that reads them, keeps the stages they read, then runs",
    )
    run.add_argument(
        "--take-over",
        action="store_true",
        help="take the run folder's lease even from a run that renewed it within its TTL (only when you know that "
        "run is gone: docs/operations.md#one-run-per-folder)",
    )
    run.add_argument(
        "--lease-ttl",
        type=float,
        metavar="SECONDS",
        help="seconds without renewal after which another run may take the folder over (default: the pipeline's "
        "lease.ttl_seconds, 60); renewed every quarter of it",
    )
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="validate a pipeline and print its plan without doing any work")
    check.add_argument("pipeline")
    check.add_argument("--output")
    check.add_argument(
        "--address", help="a Ray cluster to check each stage's resources against (joins it, runs nothing)"
    )
    check.add_argument("--stages")
    check.add_argument("--redo", help="as for run: checks the names; nothing is removed")
    check.set_defaults(func=_check)

    inspect = sub.add_parser("inspect", help="summarise a run folder, a stage folder or a shard")
    inspect.add_argument("target")
    inspect.add_argument("--rows", type=int, default=3, help="sample rows to show per stage")
    inspect.set_defaults(func=_inspect)

    report = sub.add_parser(
        "report",
        help="write RUN/_report/index.html: the funnel, each stage's numbers, images of what was kept and removed",
    )
    report.add_argument("run", help="a run folder (local path or s3://, gs://, file:// URI)")
    report.add_argument(
        "--decode-latents",
        action="store_true",
        help="also decode the shown training-shard latents with the run's VAE (loads torch, diffusers and the VAE)",
    )
    report.set_defaults(func=_report)

    verify = sub.add_parser(
        "verify", help="check every finished shard's bytes, size and rows against its marker and its upstream"
    )
    verify.add_argument("run", help="run folder (local path or s3://, gs://, file:// URI)")
    verify.add_argument("--stages", help="comma-separated stages to check (default: every started stage)")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="redo the damaged shards and what was made from them (docs/operations.md#verifying-a-run), then check "
        "those stages again",
    )
    verify.add_argument("--address", help="Ray cluster address, as for run")
    verify.add_argument("--take-over", action="store_true", help="as for run (with --repair)")
    verify.set_defaults(func=_verify)

    samples = sub.add_parser("samples", help="write the offline sample images (scikit-image, scikit-learn)")
    samples.add_argument("folder")
    samples.add_argument("--no-broken", action="store_true", help="leave out the three broken files")
    samples.add_argument("--no-duplicates", action="store_true", help="leave out the near-duplicate copies")
    samples.set_defaults(func=_samples)
    serve = sub.add_parser(
        "serve",
        usage="curate serve FOLDER --url-list FILE [--port PORT] -- COMMAND ...",
        help="serve a folder of images on 127.0.0.1 while a command runs, and write their URL list "
        "(the offline demo's download stage)",
    )
    serve.add_argument("folder", help="the images, e.g. demo-data/images (same-named .txt files become captions)")
    serve.add_argument("--url-list", required=True, help="Parquet URL list to write: url, caption, file")
    serve.add_argument("--port", type=int, default=0, help="default: the list's earlier port if free, else any free")
    serve.set_defaults(func=_serve)
    tiny = sub.add_parser(
        "tiny-models", help="build the offline demo's small random-weight models (captioner, SD3 encoders, VAE)"
    )
    tiny.add_argument("folder", help="where to write them, e.g. demo-data/models (configs/models/tiny.yaml)")
    tiny.set_defaults(func=_tiny_models)

    train = sub.add_parser("train", help="train the reference MMDiT on training shards (resumes from its output)")
    train.add_argument("config", help="trainer YAML: shards, output and training settings (see configs/train/)")
    train.add_argument(
        "--address",
        help="Ray cluster for a config with `distributed:`; default: RAY_ADDRESS, then distributed.address, "
        "else an embedded local Ray",
    )
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="sample images from a trainer checkpoint")
    sample.add_argument("checkpoint", help="a checkpoint folder, e.g. OUT/checkpoints/step-000300")
    sample.add_argument("--prompt", action="append", required=True, help="repeat for several images")
    sample.add_argument("--negative-prompt", help="default: zero conditioning, the unconditional of training")
    sample.add_argument("--run", required=True, help="the run whose text encoders and VAE to use")
    sample.add_argument("--out", default="sample.png")
    sample.add_argument("--size", default="256x256", help="WIDTHxHEIGHT, multiples of 16")
    sample.add_argument("--steps", type=int, default=28)
    sample.add_argument("--guidance", type=float, default=5.0)
    sample.add_argument("--shift", type=float, default=3.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    sample.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:  # everything after -- is the command to run while serving
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    args.serve_command = command
    try:
        return args.func(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
