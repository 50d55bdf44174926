"""The `curate` command: run, check, inspect, samples, serve, tiny-models, train, sample."""

from __future__ import annotations

import argparse
import sys

from curate.config import ConfigError
from curate.pipeline import load_pipeline


def _stages(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _run(args: argparse.Namespace) -> int:
    from curate.interrupt import Interrupted
    from curate.runner import RunError, run_pipeline

    pipeline = load_pipeline(args.pipeline)
    try:
        run_pipeline(
            pipeline,
            output=args.output,
            only=_stages(args.stages),
            address=args.address,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            redo=_stages(args.redo),
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
