"""The run report: the demo run's page checked in headless Chromium, its cost bounded whatever the shard count,
and a report that cannot be built never failing a run."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from cdp import Browser
from conftest import REPO, curate_cli

from curate import storage
from curate.report import RunReport, build_quietly, build_report
from curate.testing.run_folder import fabricate_run

ARTIFACTS = REPO / "test-artifacts"

PAGE_FACTS = """JSON.stringify({
  images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
  statuses: [...document.querySelectorAll('#funnel-table tr.status')].map(r => ({
      stage: r.dataset.stage, status: r.dataset.status, count: Number(r.dataset.count),
      shown: Number(r.querySelector('td.count').innerText.replace(/,/g, ''))})),
  stages: [...document.querySelectorAll('#funnel-table tr.stage-head')].map(r => r.dataset.stage),
  pairs: [...document.querySelectorAll('.dedup .pair')].map(p => ({
      band: p.closest('.band').dataset.band, removed: p.dataset.removed, kept: p.dataset.kept,
      images: p.querySelectorAll('img').length})),
  captions: [...document.querySelectorAll('tr.caption-row')].map(r => ({
      key: r.dataset.key, image: !!r.querySelector('img'), synthetic: r.querySelectorAll('td.caption')[1].innerText})),
  histograms: document.querySelectorAll('.filter img.chart').length,
  thresholds: document.querySelectorAll('.filter .threshold figure img').length,
  buckets: document.querySelectorAll('table.buckets tr[data-bucket]').length,
  latents: document.querySelectorAll('.encode figure img').length,
  validate: document.querySelectorAll('.validate img').length,
})"""


def marker_counts(run: Path) -> dict[tuple[str, str], int]:
    """(stage, status) -> rows, summed over every marker file (read here without curate)."""
    counts: Counter[tuple[str, str]] = Counter()
    for marker in run.glob("*/_shards/shard-*.json"):
        for status, n in json.loads(marker.read_text())["status"].items():
            counts[(marker.parent.parent.name, status)] += n
    return dict(counts)


def test_a_report_that_cannot_be_built_is_one_log_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_REPORT", "1")
    lines: list[str] = []
    assert build_quietly(str(tmp_path / "no-such-run"), lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("report: not written (FileNotFoundError")
    live = RunReport(str(tmp_path / "no-such-run"), lines.append)  # the runner's way: never raises
    live.stage_done()
    assert live.close() is None and len(lines) >= 2 and all(line.startswith("report: not written") for line in lines)


def test_a_build_reads_a_bounded_sample_whatever_the_shard_count(tmp_path, monkeypatch):
    """With the sample sizes made small, a run of 60 shards per stage opens no more shard files than one of 20
    (but for the kept-key lookup, which may need up to KEY_SHARDS); markers: the in-progress stage's all (its
    counts), a fixed number for the others. The funnel stays exact."""
    from curate.report import captions, dedup, funnel, samples

    small = {samples: {"MARKER_SCAN": 8}, funnel: {"STATUS_SHARDS": 4}, dedup: {"PAIR_SHARDS": 4, "KEY_SHARDS": 8}}
    for module, values in {**small, captions: {"CAPTION_SHARDS": 2}}.items():
        for name, value in values.items():
            monkeypatch.setattr(module, name, value)
    opened: list[str] = []
    markers: list[str] = []
    parquet_file, read_json = storage.parquet_file, storage.read_json
    monkeypatch.setattr(storage, "parquet_file", lambda uri: opened.append(uri) or parquet_file(uri))

    def counted_json(uri: str):
        if "/_shards/" in uri:
            markers.append(uri)
        return read_json(uri)

    monkeypatch.setattr(storage, "read_json", counted_json)
    reads = {}
    for shards in (20, 60):
        run = fabricate_run(str(tmp_path / f"run{shards}"), shards, rows_per_shard=3)
        opened.clear()
        markers.clear()
        html = Path(build_report(run.uri)).read_text()
        reads[shards] = (len(opened), len(set(opened)), len(markers))
        counts = marker_counts(Path(run.uri))
        for (stage, status), n in counts.items():
            assert f'data-stage="{stage}" data-status="{status}" data-count="{n}"' in html
        assert 'data-band="exact copies"' in html and 'class="caption-row"' in html and 'data-status="too_long"' in html
        assert "&lt;bench row" in html and "&gt; &amp; more" in html and "<bench row" not in html  # escaped
    assert reads[60][0] <= reads[20][0] + 8 and reads[60][1] < 30, reads
    assert reads[60][2] - reads[20][2] == 40, reads  # one more marker per new caption shard, nothing else


@pytest.mark.slow
def test_report_decodes_latents_with_the_runs_vae(demo_run):
    clone, _ = demo_run
    run = clone / "runs" / "demo"
    html = Path(build_report(str(run), decode_latents=True)).read_text()
    decoded = sorted((run / "_report" / "img").glob("decoded-*.png"))
    assert decoded and "decoded with the run&#39;s VAE" in html
    from PIL import Image

    with Image.open(decoded[0]) as image:  # a centre crop of at most 32 x 32 latent pixels, factor 8
        assert image.mode == "RGB" and max(image.size) <= 256 and min(image.size) >= 64


@pytest.mark.slow
def test_demo_report_in_chromium(demo_run, tmp_path):
    clone, result = demo_run
    run = clone / "runs" / "demo"
    # the run wrote the report as it went (after each stage) and at its end
    assert re.search(r"report: .*_report/index.html .*pictures written", result.stderr), result.stderr[-2000:]
    assert (run / "_report" / "index.html").is_file()
    command = curate_cli("report", str(run), timeout=120)
    assert command.returncode == 0, command.stderr
    page = Path(command.stdout.strip())
    assert page == run / "_report" / "index.html"

    with Browser(tmp_path / "chromium") as browser:
        browser.open(page.as_uri())
        facts = json.loads(browser.evaluate(PAGE_FACTS))
        shot = browser.screenshot(ARTIFACTS / "report.png")
        print(f"screenshot of the demo run's report: {shot}")
        assert browser.errors() == []

    assert len(facts["images"]) >= 40
    assert [i for i in facts["images"] if not (i["complete"] and i["width"] > 0)] == []
    # the funnel holds every (stage, status) of the markers, with the markers' counts
    counts = marker_counts(run)
    shown = {(r["stage"], r["status"]): r["count"] for r in facts["statuses"]}
    assert shown == counts
    assert all(r["shown"] == r["count"] for r in facts["statuses"])
    assert {s for s, _ in counts} <= set(facts["stages"])
    assert {("ingest", "not_an_image"), ("ingest", "truncated"), ("caption", "skipped_duplicate")} <= set(shown)
    # dedup pairs: the exact copy (cat = chelsea) and the near copies, kept and removed image side by side
    assert any(p["band"] == "exact copies" for p in facts["pairs"])
    assert any(p["band"] != "exact copies" for p in facts["pairs"])
    assert all(p["images"] == 2 for p in facts["pairs"])
    # caption rows: thumbnail, original and synthetic caption
    assert facts["captions"] and all(c["image"] and c["synthetic"].strip() for c in facts["captions"])
    assert facts["histograms"] == 2 and facts["thresholds"] >= 6  # prefilter and quality, images near thresholds
    assert facts["buckets"] >= 1 and facts["latents"] >= 1 and facts["validate"] >= 2  # loss curve and samples
    assert os.path.getsize(shot) > 10_000
