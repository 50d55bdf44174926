"""Build `RUN/_report/index.html`: read the run folder (records, markers, a bounded sample of rows), make the
page model, render it with Jinja2 and write it with its pictures beside it.

Jinja2 (autoescaping templates in `curate/report/templates/`) rather than HTML built from strings: every
caption, error message and key is escaped in one place, and the layout lives in files a reader can change
without touching the code. Charts are PNG files from matplotlib. Nothing is loaded from the network: the page
has no scripts, and its styles are inline, so it renders offline from a disk or an object-store copy.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import yaml

from curate import __version__, storage
from curate.report.captions import caption_section
from curate.report.charts import funnel_png
from curate.report.dedup import dedup_section
from curate.report.filters import filter_section
from curate.report.funnel import Stage, removed_here, stage_info
from curate.report.pictures import ImageFolder
from curate.report.samples import MARKER_SCAN
from curate.report.training import encode_section, validate_section
from curate.runfolder import RunDir

RUN_LOG_LINES = 10


def report_uri(run_uri: str) -> str:
    return storage.join(storage.absolute(run_uri), "_report", "index.html")


def _runs(run: RunDir) -> list[dict[str, Any]]:
    """The last invocations (runs.jsonl), newest first."""
    if not storage.exists(run.log_uri):
        return []
    lines = storage.read_text(run.log_uri).strip().splitlines()[-RUN_LOG_LINES:]
    return [json.loads(line) for line in reversed(lines) if line.strip()]


def saved_pipeline(run: RunDir) -> dict[str, Any]:
    """RUN/pipeline.yaml, parsed with libyaml where PyYAML has it (the resolved pipeline of a real run takes
    about a second with the pure-Python parser on a busy 2-core machine)."""
    if not storage.exists(run.pipeline_uri):
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(storage.read_text(run.pipeline_uri), Loader=loader) or {}


def stage_names(run: RunDir, saved: dict[str, Any]) -> list[str]:
    """Stages in pipeline order, then any other stage folder (as `curate.inspect.stage_names`)."""
    names = [s.get("name") or s["kind"] for s in saved.get("stages", [])]
    return names + [
        n for n in storage.list_names(run.uri) if n not in names and storage.exists(run.stage(n).record_uri)
    ]


def guarded(name: str, make: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One section; a section that fails (a shard deleted under it, a bug) says why instead of losing the page."""
    try:
        return make(*args)
    except Exception as e:
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}


def page_model(run: RunDir, pictures: ImageFolder, decode_latents: bool = False) -> dict[str, Any]:
    saved = saved_pipeline(run)
    stages: list[Stage] = [stage_info(run, name) for name in stage_names(run, saved)]
    by_kind: dict[str, list[Stage]] = {}
    for info in stages:
        by_kind.setdefault(info.kind, []).append(info)
    started = [s for s in stages if s.summary.get("shards")]
    filters = [guarded(s.name, filter_section, run, s.name, pictures) for s in by_kind.get("filter", [])]
    dedups = [guarded(s.name, dedup_section, run, s.name, pictures) for s in by_kind.get("dedup", []) if s in started]
    removed_here(
        stages,
        {f["name"]: dict((rule, n) for rule, n, _ in f["removed"]) for f in filters if f.get("ready")},
        {d["name"]: d["report"] for d in dedups if d.get("report")},
    )
    funnel = pictures.put("funnel.png", funnel_png([(s.name, s.rows, s.ok) for s in started])) if started else None
    return {
        "run": run.uri,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "stages": stages,
        "funnel_chart": funnel,
        "filters": filters,
        "dedup": dedups,
        "captions": [
            guarded(s.name, caption_section, run, s, pictures) for s in by_kind.get("caption", []) if s in started
        ],
        "encode": [
            guarded(s.name, encode_section, run, s, pictures, saved.get("models"), decode_latents)
            for s in by_kind.get("encode", [])
            if s in started
        ],
        "validate": [
            guarded(s.name, validate_section, run, s, pictures)
            for s in by_kind.get("validate", [])
            if s.state == "complete"
        ],
        "runs": _runs(run),
        "marker_scan": MARKER_SCAN,
    }


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    """The templates, compiled once per process (a Jinja2 Environment is safe to share between threads)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("curate.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda v: "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.2f}"
    env.filters["pct"] = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    env.filters["g"] = lambda v, digits=3: "-" if v is None else f"{v:.{digits}g}"
    return env


def render(page: dict[str, Any]) -> str:
    return environment().get_template("index.html.j2").render(**page)


def build_report(run_uri: str, log: Callable[[str], None] | None = None, decode_latents: bool = False) -> str:
    """Write RUN/_report/index.html (and its pictures under RUN/_report/img/); returns the page's URI.
    ``decode_latents``: also decode the shown latents with the run's VAE (loads torch, diffusers and the VAE)."""
    started = time.perf_counter()
    run = RunDir(storage.absolute(run_uri))
    if not storage.is_dir(run.uri):
        raise FileNotFoundError(f"no run folder at {run.uri}")
    folder = storage.join(run.uri, "_report")
    pictures = ImageFolder(folder)
    html = render(page_model(run, pictures, decode_latents))
    uri = storage.join(folder, "index.html")
    storage.write_atomic(uri, html.encode())
    pruned = pictures.prune()
    if log is not None:
        log(
            f"report: {uri} ({len(html) / 1e3:.0f} kB, {pictures.written} pictures written, {pruned} stale removed, "
            f"{time.perf_counter() - started:.1f} s)"
        )
    return uri


def build_quietly(run_uri: str, log: Callable[[str], None]) -> str | None:
    """`build_report` for the runner: a report that cannot be built is one log line, never a failed run."""
    try:
        return build_report(run_uri, log)
    except Exception as e:
        log(f"report: not written ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})")
        return None


__all__ = ["build_quietly", "build_report", "page_model", "render", "report_uri"]
