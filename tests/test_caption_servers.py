"""The caption stage on inference servers: servers the stage starts from a command template (the project's own
OpenAI-compatible server, `curate.testing.openai_server`, started exactly as a user's `vllm serve` template is) or
servers the user runs, and the client that keeps them full.

- two servers, one SIGKILLed mid-stage: it is restarted, and every row is captioned exactly once;
- Ctrl-C (SIGINT) to `curate run` leaves no server process behind;
- a 429 storm shrinks the window, which grows back, and the shard finishes; images are downscaled first;
- a server that hangs: its requests time out or move to the other, every row is captioned;
- a model name the servers do not serve fails before any row is sent, naming the field.

The servers run the engine model (an engine's cost, captions from a hash of the image), so these test the
orchestration and the client; captions of a real model through the same client are tested in test_caption.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate import storage
from curate.caption.drive import pixel_budget
from curate.caption.servers import ServersConfig, placements
from curate.caption.window import Window
from curate.config import ConfigError
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir, summarize
from curate.runner import RunError, StageJob, execute_shard, prepare_stage, run_pipeline, stage_services
from curate.stages import STAGES
from curate.stages.spec import WorkContext
from curate.testing.openai_server import Behaviour, CompletionServer

ROWS, SHARD = 36, 12
SIM = "{python} -m curate.testing.openai_server --host {host} --port {port} --served-model-name {served_model_name}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("server-images")
    rng = np.random.default_rng(1)
    for i in range(ROWS):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8)).save(folder / f"im-{i:03d}.png")
    return folder


def pipeline_for(run: Path, images: Path, *, servers: str | None = None, extra: str = "") -> str:
    source = f"    servers: {{{servers}}}\n" if servers is not None else ""
    return f"""\
name: servers-test
output: {run}
stages:
  - kind: local
    name: ingest
    path: {images}
    shard_size: {SHARD}
  - kind: caption
    input: ingest
    backend: openai
    max_new_tokens: 16
    decode_threads: 2
{source}{extra}    resources: {{num_cpus: 1, concurrency: 1}}
"""


def managed(tag: str, replicas: int, args: str = "", restarts: int = 2) -> str:
    return (
        f"engine: command, command: '{SIM} {args}', model: {tag}, num_gpus: 0, num_cpus: 0, replicas: {replicas}, "
        f"host: 127.0.0.1, startup_timeout_s: 60, max_restarts: {restarts}, stop_timeout_s: 5"
    )


def ingest(pipeline) -> RunDir:
    """The image shards, written in this process by the runner's own shard function."""
    run = RunDir(storage.absolute(pipeline.output))
    stage = pipeline.stage("ingest")
    _, tasks = prepare_stage(pipeline, run, stage)
    for task in tasks:
        assert execute_shard(StageJob("local", stage, WorkContext(run.uri, "ingest", None)), task, None)["ok"]
    folder = run.stage("ingest")
    storage.write_json(folder.success_uri, {"stage": "ingest", **summarize(folder.shard_stats())})
    return run


def caption_here(pipeline, before=None) -> tuple[list[dict], list[dict], list[dict], object]:
    """The caption stage with its services (the servers) and its shards run in this process: its rows, its shard
    markers' counters, the servers' /stats and the worker's client. ``before(urls)`` runs once the servers are up,
    before the first shard."""
    run = ingest(pipeline)
    stage = pipeline.stage("caption")
    _, tasks = prepare_stage(pipeline, run, stage)
    context = WorkContext(run.uri, "caption", run.stage("ingest").uri)
    spec = STAGES["caption"]
    with stage_services(spec, StageJob("caption", stage, context), log=lambda line: None) as job:
        urls = job.context.services
        if before is not None:
            before(urls)
        captioner = spec.setup(stage, job.context)
        for task in tasks:
            result = execute_shard(job, task, captioner)
            assert result["ok"], result["error"]
        stats = [get(u, "stats") for u in urls]
    rows = pa.concat_tables([storage.read_parquet(u) for u in run.stage("caption").shard_uris()]).to_pylist()
    markers = [s.extra for s in run.stage("caption").shard_stats()]
    return rows, markers, stats, captioner


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/" + path, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url.rsplit("/v1", 1)[0] + "/" + path, json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def processes(tag: str) -> dict[int, list[str]]:
    """Live processes whose command line holds ``tag`` (the test's unique served model name)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                args = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace").split("\0")
                state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if tag in args and state != "Z":
                found[int(entry.name)] = args
    return found


def none_left(tag: str, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not processes(tag)


def wait_for(predicate, within_s: float = 60.0, every_s: float = 0.05):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {within_s} s")


def status_of(run: Path, server: int) -> dict | None:
    path = run / "caption" / "_servers" / f"server-{server:02d}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def engine_pid(tag: str, url: str) -> int:
    """The pid of the server process (not its launcher) listening at ``url``."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    engine = ["-m", "curate.testing.openai_server"]
    return next(p for p, a in processes(tag).items() if a[1:3] == engine and port in a)


def completed(url: str) -> int:
    try:
        return get(url, "stats")["completed"]
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------------
# managed servers (Ray actors started by the stage's services)


def test_a_killed_server_is_restarted_and_every_row_is_captioned_once(ray_cluster, images, tmp_path):
    tag = f"sim-{uuid.uuid4().hex[:8]}"
    run = tmp_path / "run"
    servers = managed(tag, replicas=2, args="--slots 2 --step-s 0.01 --min-tokens 4 --max-tokens 16")
    pipeline = parse_pipeline(pipeline_for(run, images, servers=servers, extra="    client: {max_in_flight: 3}\n"))
    killed: dict[str, int] = {}

    def kill_server_0_mid_stage(urls: list[str]) -> None:  # it SIGKILLs itself at its 4th completion, mid-stage
        killed["pid"] = engine_pid(tag, urls[0])
        post(urls[0], "control", {"kill_after": 4})

    rows, markers, _, _ = caption_here(pipeline, before=kill_server_0_mid_stage)
    assert killed
    keys = pa.concat_tables([storage.read_parquet(str(p)) for p in sorted((run / "ingest").glob("shard-*.parquet"))])
    assert [r["key"] for r in rows] == keys["key"].to_pylist()  # every row once, in shard order, none lost
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["caption_raw"] and r["captioner"] == f"{tag} via command" for r in rows)
    assert sum(m["retries"] + m["moved"] for m in markers) >= 1  # its requests in flight went again

    first = status_of(run, 0)
    assert first["restarts"] == 1 and len(first["starts"]) == 2 and first["state"] == "stopped", first
    assert first["exit_codes"][0] != 0  # the killed start
    log = (run / "caption" / "_servers" / "server-00.log").read_text()
    assert log.count("=== curate: start") == 2 and f"killing this server (pid {killed['pid']})" in log
    assert status_of(run, 1)["restarts"] == 0
    assert none_left(tag)  # stopped with the stage


def test_ctrl_c_leaves_no_server_process_behind_and_a_rerun_finishes(ray_cluster, images, tmp_path):
    tag = f"sim-{uuid.uuid4().hex[:8]}"
    run = tmp_path / "run"
    text = pipeline_for(run, images, servers=managed(tag, replicas=2))
    ingest(parse_pipeline(text))
    (tmp_path / "pipeline.yaml").write_text(text)
    command = [sys.executable, "-m", "curate.cli", "run", str(tmp_path / "pipeline.yaml"), "--stages", "caption"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    curate = subprocess.Popen(
        [*command, "--address", ray_cluster], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # both servers up: the stage is past its model check and into its shards (Ray Data starting its workers)
        wait_for(lambda: all((s := status_of(run, i)) and s["state"] == "ready" for i in (0, 1)))
        assert len(processes(tag)) == 4  # two launchers, two servers
        curate.send_signal(signal.SIGINT)
        output, _ = curate.communicate(timeout=60)
    finally:
        if curate.poll() is None:
            curate.kill()
    assert curate.returncode != 0, output
    assert none_left(tag), processes(tag)
    assert all(status_of(run, i)["state"] == "stopped" for i in (0, 1))
    assert not (run / "caption" / "_SUCCESS.json").exists()

    # the same command again finishes the stage, with new servers, and stops them at its end
    record = run_pipeline(parse_pipeline(text), only=["caption"], log=lambda line: None)["caption"]
    assert record["status"] == {"ok": ROWS} and (run / "caption" / "_SUCCESS.json").exists()
    logs = [(run / "caption" / "_servers" / f"server-{i:02d}.log").read_text() for i in (0, 1)]
    assert all(log.count("=== curate: start") == 2 for log in logs)  # each log holds both runs' starts
    assert none_left(tag), processes(tag)


# ----------------------------------------------------------------------------------------------------
# the client against managed servers (the stage's services and shard function, in this process)


def test_a_429_storm_backs_off_and_finishes(ray_cluster, images, tmp_path):
    tag = f"sim-{uuid.uuid4().hex[:8]}"
    servers = managed(tag, replicas=1, args="--slots 4 --step-s 0.005 --storm-after 4 --storm-count 25")
    client = "    client: {max_in_flight: 8, backoff_s: 0.01, max_image_pixels: 400}\n"
    pipeline = parse_pipeline(pipeline_for(tmp_path / "run", images, servers=servers, extra=client))
    rows, markers, (stats,), captioner = caption_here(pipeline)
    assert len(rows) == ROWS and {r["status"] for r in rows} == {"ok"}
    assert stats["answered"]["429"] == 25 and stats["completed"] == ROWS
    assert sum(m["pushed_back"] for m in markers) == 25 and sum(m["retries"] for m in markers) == 0
    assert min(m["window_min"] for m in markers) < 8  # the window shrank ...
    assert captioner.servers[0].window.limit > min(m["window_min"] for m in markers)  # ... and grew back
    assert stats["max_image_pixels"] <= 400  # images downscaled to the pixel budget before they were sent
    assert none_left(tag)


def test_a_hung_servers_requests_move_to_the_other(ray_cluster, images, tmp_path):
    tag = f"sim-{uuid.uuid4().hex[:8]}"
    servers = managed(tag, replicas=2, args="--slots 2 --step-s 0.01")
    client = "    client: {max_in_flight: 3, timeout_s: 1.0, backoff_s: 0.01}\n"
    pipeline = parse_pipeline(pipeline_for(tmp_path / "run", images, servers=servers, extra=client))

    def hang_server_0(urls: list[str]) -> None:  # after its 2nd completion, it answers nothing more
        post(urls[0], "control", {"hang_after": 2})

    rows, markers, stats, _ = caption_here(pipeline, before=hang_server_0)
    assert len(rows) == ROWS and {r["status"] for r in rows} == {"ok"}
    assert sum(m["timeouts"] for m in markers) >= 1
    assert stats[0]["completed"] < ROWS // 2 and stats[0]["completed"] + stats[1]["completed"] >= ROWS
    assert none_left(tag)


# ----------------------------------------------------------------------------------------------------
# servers the user runs


def test_a_wrong_model_name_fails_before_any_row_is_sent(ray_cluster, images, tmp_path):
    with CompletionServer(None, "served-model", Behaviour()) as server:
        extra = f"    endpoints: ['{server.base_url}']\n    client: {{model: not-the-served-one}}\n"
        pipeline = parse_pipeline(pipeline_for(tmp_path / "run", images, extra=extra))
        ingest(pipeline)
        with pytest.raises(RunError) as error:
            run_pipeline(pipeline, only=["caption"], log=lambda line: None)
        assert server.stats.requests == 0
    message = str(error.value)
    assert "client.model: 'not-the-served-one' is not served by" in message and "'served-model'" in message
    assert not list((tmp_path / "run" / "caption").glob("shard-*.parquet"))


# ----------------------------------------------------------------------------------------------------
# units


def test_servers_config_names_the_problem(images, tmp_path):
    cases = {
        "engine: command, model: m": "engine: command needs `command`",
        "engine: vllm, model: m, num_gpus: 0": "replicas: auto means one server per num_gpus GPUs",
        "engine: command, model: m, command: 'serve {model}'": "no {port}",
        "engine: command, model: m, command: 'serve {modle} --port {port}'": "unknown placeholder or stray brace",
    }
    for servers, problem in cases.items():
        with pytest.raises(ConfigError) as error:
            parse_pipeline(pipeline_for(tmp_path, images, servers=servers))
        assert "stages[1].servers" in str(error.value) and problem in str(error.value), str(error.value)
    with pytest.raises(ConfigError, match=r"resources\.num_gpus: the servers hold the GPUs"):
        parse_pipeline(pipeline_for(tmp_path, images, servers="model: m").replace("concurrency: 1", "num_gpus: 1"))
    # the engines' own templates, filled
    config = ServersConfig(
        model="Qwen/Qwen2.5-VL-7B-Instruct", num_gpus=2, extra_args=("--limit-mm-per-prompt", '{"image": 1}')
    )
    spec = config.spec(8000)
    words = [w.format(**spec.values, port="8000", host="0.0.0.0") for w in spec.command]
    assert words[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct"] and words[-2:] == [
        "--limit-mm-per-prompt",
        '{"image": 1}',
    ]
    assert "--tensor-parallel-size" in words and words[words.index("--tensor-parallel-size") + 1] == "2"


def test_placements_per_gpus_per_node_or_a_number():
    nodes = [
        {"Alive": True, "NodeID": "a", "Resources": {"GPU": 8.0, "CPU": 64.0}},
        {"Alive": True, "NodeID": "b", "Resources": {"GPU": 4.0}},
        {"Alive": True, "NodeID": "head", "Resources": {"CPU": 8.0}},
        {"Alive": False, "NodeID": "gone", "Resources": {"GPU": 8.0}},
    ]
    auto = placements(ServersConfig(model="m", num_gpus=2), nodes)
    assert auto == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)]
    assert placements(ServersConfig(model="m", num_gpus=8, replicas="per_node"), nodes) == [("a", 0)]
    assert placements(ServersConfig(model="m", num_gpus=0, replicas=3), nodes) == [(None, 0), (None, 1), (None, 2)]


def test_the_window_halves_once_per_push_back_and_grows_back():
    window = Window(maximum=32)
    epoch = window.epoch
    assert window.on_push_back(epoch) and window.limit == 16
    assert not window.on_push_back(epoch)  # another answer of the same burst: no second halving
    for _ in range(4):  # a storm: every request sent at the new size pushed back too
        window.on_push_back(window.epoch)
    assert window.limit == 1 and window.lowest == 1
    rounds = 0
    while window.limit < 32 and rounds < 40:  # answers at a steady latency: back toward where the storm began
        for _ in range(window.limit):
            window.on_answer(window.epoch, 0.1)
        rounds += 1
    assert window.limit == 32 and rounds <= 12, rounds
    slow = Window(maximum=32)
    slow.on_push_back(slow.epoch)
    slow.on_answer(slow.epoch, 0.1)
    for _ in range(50):  # latency climbing: the server queues, so the window does not grow
        slow.on_answer(slow.epoch, 1.0)
    assert slow.limit == 16


def test_pixel_budgets_read_from_image_processor_files():
    assert pixel_budget({"image_processor_type": "Qwen2VLImageProcessor", "size": {"longest_edge": 12544}}) == 12544
    assert pixel_budget({"max_pixels": 1003520, "min_pixels": 3136}) == 1003520
    assert pixel_budget({"size": {"height": 448, "width": 448}}) == 448 * 448
    assert pixel_budget({"size": {"shortest_edge": 336}, "image_grid_pinpoints": [[336, 672], [672, 672]]}) == 672**2
    assert pixel_budget({"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 1536}}) == 1536**2
    assert pixel_budget({"size": {"shortest_edge": 224}}) is None
