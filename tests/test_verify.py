"""`curate verify`: a flipped byte, a truncated file, a deleted shard and a shard overwritten with a consistent
marker are each found, and `--repair` brings back the bytes of the undisturbed run, as does a resume for a shard
whose size changed; what a repair redoes follows the stage graph; the reader can verify as it opens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import REPO, curate_cli

from curate import storage
from curate.checksums import Digest, HashingSink, stream_digest
from curate.pipeline import load_pipeline, parse_pipeline
from curate.runfolder import RunDir, ShardDamaged, ShardStats
from curate.runner import run_pipeline
from curate.serve import write_url_list
from curate.verify import repair_plan

pytest_plugins = ["encode_helpers"]  # fixtures: tiny_sd3, encoded_run

PIPELINE = """\
name: verify-test
output: {out}
stages:
  - {{kind: local, name: ingest, path: {images}, shard_size: 4}}
  - {{kind: filter, name: prefilter, min_side: 64}}
"""


def _quiet(line: str) -> None:
    pass


def _shards(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("*/shard-*.parquet"))}


def _checksums(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): json.loads(p.read_text())["checksum"] for p in sorted(run.glob("*/_shards/*"))}


def test_damage_is_found_and_repaired_to_the_undisturbed_bytes(ray_cluster, sample_images, tmp_path):
    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(out=run, images=sample_images))
    run_pipeline(parse_pipeline(path.read_text()), log=_quiet)
    reference = _shards(run)
    sums = _checksums(run)
    assert len(reference) >= 2 * 6 and all(s.startswith("crc32c:") for s in sums.values())

    ingest, prefilter = RunDir(str(run)).stage("ingest"), RunDir(str(run)).stage("prefilter")
    flipped = bytearray(Path(ingest.shard(1)).read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    Path(ingest.shard(1)).write_bytes(bytes(flipped))
    truncated = Path(prefilter.shard(2))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    Path(ingest.shard(4)).unlink()
    # overwritten by hand with a valid file and a marker to match: only the upstream comparison sees it
    table = pq.read_table(prefilter.shard(3)).slice(1)
    digest = Digest()
    size = storage.write_parquet_atomic(prefilter.shard(3), table, digest=digest)
    old = ShardStats.from_dict(storage.read_json(prefilter.marker(3)))
    prefilter.write_marker(ShardStats(3, table.num_rows, old.status, 0.0, size, {}, digest.tagged()))

    result = curate_cli("verify", str(run), "--repair", "--address", ray_cluster)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    found: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith(("ingest/", "prefilter/")):
            where, what = line.split(": ", 1)
            found.setdefault(where, []).append(what)
    assert sorted(found) == [
        "ingest/shard-00001", "ingest/shard-00004", "prefilter/shard-00002", "prefilter/shard-00003"
    ], result.stdout  # fmt: skip
    assert found["ingest/shard-00001"][0].startswith("checksum crc32c:"), found
    assert "the marker says crc32c:" in found["ingest/shard-00001"][0]
    assert found["ingest/shard-00004"] == ["the file is missing"]
    assert "bytes, the marker says" in found["prefilter/shard-00002"][0]
    assert found["prefilter/shard-00002"][1:] == ["no readable Parquet footer"]
    assert "rows, its upstream shard has" in found["prefilter/shard-00003"][0]
    # the repaired ingest shards' downstream shards were redone too, and nothing else
    assert lines[-1].startswith("repaired: ingest shards 1, 4; prefilter shards 1, 2, 3, 4;"), result.stdout
    assert _shards(run) == reference
    assert _checksums(run) == sums

    # a resume checks every stage's shard sizes (one listing each) and redoes a shard whose size changed, with
    # the shards made from it
    shard = run / "ingest" / "shard-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    said: list[str] = []
    run_pipeline(parse_pipeline(path.read_text()), log=said.append)
    assert any("[ingest] shard-00002: " in line and "it is redone" in line for line in said), said
    assert "[ingest] repair: redoing ingest shard 2" in said and "[prefilter] repair: redoing prefilter shard 2" in said
    assert _shards(run) == reference


def test_repair_plan_follows_the_demo_graph(tmp_path, sample_images, tiny_models, monkeypatch):
    """1:1 stages redo the same shard indices; a stage whose global step (the quality filter's top fraction, dedup)
    or whose whole plan (validate) reads a repaired stage is redone whole, and so is everything reading it."""
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "images").symlink_to(sample_images)
    (tmp_path / "demo-data" / "models").symlink_to(tiny_models)
    write_url_list(sample_images, "http://127.0.0.1:8000", tmp_path / "demo-data" / "urls.parquet")
    monkeypatch.chdir(tmp_path)
    pipeline = load_pipeline(REPO / "pipelines" / "demo.yaml")
    run = RunDir(str(tmp_path / "run"))
    for stage in pipeline.stages:
        storage.write_json(run.stage(stage.stage_name).record_uri, {"kind": stage.kind, "shards": 4})
    whole = dict.fromkeys(["quality", "sscd", "dedup", "caption", "encode", "validate"])
    assert repair_plan(pipeline, run, {"ingest": {1}}) == {"ingest": {1}, "prefilter": {1}, "score": {1}, **whole}
    assert repair_plan(pipeline, run, {"score": {2}}) == {"score": {2}, **whole}
    # a damaged dedup shard is rewritten from the dedup step's kept results: only its own index downstream
    assert repair_plan(pipeline, run, {"dedup": {0}}) == {"dedup": {0}, "caption": {0}, "encode": {0}, "validate": None}
    storage.remove_tree(run.stage("validate").uri)  # a stage not started has nothing to redo
    assert repair_plan(pipeline, run, {"encode": {3}}) == {"encode": {3}}


def test_reader_verifies_each_file_as_it_opens_it(encoded_run, tmp_path):
    from curate.shards import ShardDataset

    stage = tmp_path / "encode16"
    shutil.copytree(Path(encoded_run["run"]) / "encode16", stage)
    rows = sum(len(b["key"]) for b in ShardDataset(str(stage), batch_size=4, shuffle=False, verify=True))
    assert rows > 0
    shard = sorted(stage.glob("shard-*.parquet"))[-1]
    damaged = bytearray(shard.read_bytes())
    damaged[100] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    with pytest.raises(ShardDamaged, match=f"{shard.name}: checksum crc32c:[0-9a-f]+, the marker says"):
        for _ in ShardDataset(str(stage), batch_size=4, shuffle=False, verify=True):
            pass


def test_every_write_and_read_path_gives_the_crc32c_of_the_file(tmp_path):
    """The local write (hashed from the page cache by a thread as the file grows), the object-store write
    (HashingSink), the local read and the stream read all give the CRC32C of the bytes on disk."""
    rng = np.random.default_rng(0)
    blobs = pa.array([rng.bytes(100_000) for _ in range(150)], pa.binary())  # 15 MB, three row groups
    table = pa.table({"key": [f"k{i:04d}" for i in range(150)], "blob": blobs})
    digest = Digest()
    path = tmp_path / "shard.parquet"
    size = storage.write_parquet_atomic(str(path), table, row_group_sizes=[50, 50, 50], digest=digest)
    data = path.read_bytes()
    expected = f"crc32c:{crc32c.crc32c(data):08x}"
    assert (size, digest.size, digest.tagged()) == (len(data), len(data), expected)
    assert not list(tmp_path.glob("*.tmp*")) and pq.read_table(path).equals(table)

    sunk = Digest()
    with pafs.LocalFileSystem().open_output_stream(str(tmp_path / "sunk.parquet")) as stream:
        sink = HashingSink(stream, sunk)
        pq.write_table(table, sink, row_group_size=50)
        sink.close()
    assert sunk.tagged() == f"crc32c:{crc32c.crc32c((tmp_path / 'sunk.parquet').read_bytes()):08x}"

    local = storage.read_digest(str(path))
    with pafs.LocalFileSystem().open_input_stream(str(path)) as stream:
        streamed = stream_digest(stream, chunk=3 << 20)
    for found in (local, streamed):
        assert (found.size, found.checksum, found.tail) == (len(data), expected, data[-len(found.tail) :])
        assert len(found.tail) == min(len(data), 1 << 20)
