"""The README's demo command works on a fresh clone."""

from __future__ import annotations

import json
import urllib.request

import pyarrow.parquet as pq
import pytest
from conftest import REPO, readme_command


def test_readme_test_command_is_what_ci_runs():
    assert readme_command("Run the tests") in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_demo_command_on_a_fresh_clone(demo_run):
    clone, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    run = clone / "runs" / "demo"
    record = json.loads((run / "ingest" / "_SUCCESS.json").read_text())
    assert record["rows"] == 31 and record["status"]["ok"] == 28
    # the demo begins as the real job does: img2dataset downloaded every sample from a server on 127.0.0.1 that
    # ran exactly as long as the run, and the broken samples came out with statuses
    assert json.loads((run / "ingest" / "_stage.json").read_text())["kind"] == "download"
    assert (
        record["extra"]["urls"] == 31 and record["status"]["not_an_image"] == 2 and record["status"]["truncated"] == 1
    )
    url = pq.read_table(clone / "demo-data" / "urls.parquet")["url"][0].as_py()
    assert url.startswith("http://127.0.0.1:") and f"curate serve: stopped {url.rsplit('/', 1)[0]}" in result.stderr
    with pytest.raises(OSError):  # the server is gone with the command
        urllib.request.urlopen(url, timeout=5)
    for stage in ("sscd", "dedup", "caption", "encode", "validate"):  # every stage ran to completion
        assert (run / stage / "_SUCCESS.json").is_file(), stage
    dedup = json.loads((run / "dedup" / "_SUCCESS.json").read_text())
    encode = json.loads((run / "encode" / "_SUCCESS.json").read_text())
    assert encode["status"]["skipped_duplicate"] >= 2  # the exact (cat = chelsea) and near copies were dropped
    assert dedup["rows"] == encode["rows"] == 31  # nothing lost between stages
    report = (run / "validate" / "report.md").read_text()
    assert "## Samples" in report and (run / "validate" / "samples.png").is_file()
    assert "embedded local Ray" in result.stderr
