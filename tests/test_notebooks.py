"""The inspection notebook executes against a real run and shows what it promises."""

from __future__ import annotations

import nbclient
import nbformat
from conftest import REPO

from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline


def execute(notebook: str, run_dir, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("CURATE_RUN", str(run_dir))
    nb = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", ""))
            data = out.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(text), images


def test_inspect_shards_notebook(ray_cluster, sample_images, tmp_path, monkeypatch):
    pipeline = parse_pipeline(
        f"name: nb\noutput: {tmp_path / 'run'}\nstages:\n  - {{kind: local, name: ingest, path: {sample_images}, "
        "shard_size: 12}\n"
    )
    run_pipeline(pipeline, log=lambda line: None)
    text, images = outputs(execute("inspect_shards.ipynb", tmp_path / "run", monkeypatch))
    assert "ingest" in text and "complete" in text
    assert "truncated" in text and "empty_file" in text and "decode_error" in text  # status breakdown
    assert "shown 12 ok images of the first shard" in text  # the first 12 files in path order are all good
    assert "3 rows did not come through" in text and "not a recognised image format" in text
    assert images == 3  # status bars, thumbnail grid, per-shard statistics
