"""The `local` source accounts for every image file exactly once, good or broken, on any filesystem."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import storage
from curate.inspect import read_stage
from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline
from curate.schema import IMAGE_SCHEMA, make_key

PIPELINE = """\
name: t
output: {out}
stages:
  - kind: local
    name: ingest
    path: {path}
    shard_size: {shard_size}
    max_pixels: 1000000
{extra}"""


def run(out, path, shard_size=5, extra="", quiet=True):
    pipeline = parse_pipeline(PIPELINE.format(out=out, path=path, shard_size=shard_size, extra=extra))
    return run_pipeline(pipeline, log=(lambda line: None) if quiet else print)


def image_files(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.rsplit(".", 1)[-1] in {"jpg", "png", "webp", "gif"})


def test_every_file_once_with_status(ray_cluster, images_copy, tmp_path):
    # more trouble: an unreadable file and an image over max_pixels
    (images_copy / "locked.png").write_bytes((images_copy / "coins.png").read_bytes())
    (images_copy / "locked.png").chmod(0)
    big = images_copy / "huge.png"
    from PIL import Image

    Image.new("L", (1200, 1000)).save(big)
    records = run(tmp_path / "run", images_copy)
    table = read_stage(str(tmp_path / "run"), "ingest")
    assert table.schema.equals(IMAGE_SCHEMA, check_metadata=False)

    files = image_files(images_copy)
    urls = [os.path.basename(u) for u in table["url"].to_pylist()]
    assert sorted(urls) == files and len(set(urls)) == len(files)
    keys = table["key"].to_pylist()
    assert len(set(keys)) == len(keys) == len(files)
    assert set(keys) == {make_key(f) for f in files}

    status = dict(zip(urls, table["status"].to_pylist(), strict=True))
    expected_bad = {
        "empty.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "not-an-image.jpg": "decode_error",
        "huge.png": "too_large",
    }
    if os.geteuid() != 0:  # root reads files whatever their mode
        expected_bad["locked.png"] = "read_error"
    for name, expected in expected_bad.items():
        assert status[name] == expected, name
    assert all(s == "ok" for n, s in status.items() if n not in expected_bad)
    assert records["ingest"]["rows"] == len(files)
    assert sum(records["ingest"]["status"].values()) == len(files)


def test_rows_carry_bytes_size_hash_and_caption(ray_cluster, sample_images, tmp_path):
    run(tmp_path / "run", sample_images)
    rows = {os.path.basename(r["url"]): r for r in read_stage(str(tmp_path / "run"), "ingest").to_pylist()}
    astronaut = rows["astronaut.jpg"]
    raw = (sample_images / "astronaut.jpg").read_bytes()
    assert astronaut["image"] == raw and astronaut["sha256"] == hashlib.sha256(raw).hexdigest()
    assert (astronaut["width"], astronaut["height"], astronaut["format"]) == (512, 512, "JPEG")
    assert astronaut["caption"] == (sample_images / "astronaut.txt").read_text().strip()
    rotated = rows["chelsea-exif.jpg"]
    assert (rotated["width"], rotated["height"]) == (451, 300)  # EXIF orientation applied
    assert rows["coffee-small.jpg"]["caption"] is None  # no .txt beside it
    broken = rows["truncated.jpg"]
    assert broken["image"] is None and broken["error"] and broken["sha256"]


def test_captions_from_a_side_table_and_a_glob(ray_cluster, sample_images, tmp_path):
    table = pa.table({"name": ["astronaut.jpg", "rocket.webp"], "text": ["side caption A", "side caption B"]})
    pq.write_table(table, tmp_path / "captions.parquet")
    extra = f"    captions: {{table: {tmp_path / 'captions.parquet'}, file_column: name, caption_column: text}}\n"
    run(tmp_path / "run", f"{sample_images}/*.[jw]*", extra=extra)
    rows = {os.path.basename(r["url"]): r for r in read_stage(str(tmp_path / "run"), "ingest").to_pylist()}
    assert set(rows) == {f for f in image_files(sample_images) if f.rsplit(".", 1)[1] in {"jpg", "webp"}}
    assert rows["astronaut.jpg"]["caption"] == "side caption A"
    assert rows["rocket.webp"]["caption"] == "side caption B"
    assert rows["coffee.jpg"]["caption"] is None


def test_file_uri_input_and_output(ray_cluster, sample_images, tmp_path):
    """Run folder and input given as file:// URLs go through the same pyarrow filesystem layer."""
    out = f"file://{tmp_path}/run"
    records = run(out, f"file://{sample_images}", shard_size=7)
    assert records["ingest"]["rows"] == len(image_files(sample_images))
    assert (tmp_path / "run" / "ingest" / "shard-00000.parquet").is_file()
    assert read_stage(out, "ingest")["url"][0].as_py().startswith("file://")


def test_storage_layer_on_fsspec_memory_filesystem():
    """Schemes pyarrow lacks (here fsspec's memory://) go through fsspec behind the same functions."""
    root = "memory://curate-test/run"
    storage.write_json(storage.join(root, "a", "x.json"), {"n": 1})
    table = pa.table({"key": ["a", "b"]})
    storage.write_parquet_atomic(storage.join(root, "a", "t.parquet"), table)
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"n": 1}
    assert storage.read_parquet(storage.join(root, "a", "t.parquet")).equals(table)
    assert [f.relative for f in storage.list_files(root)] == ["a/t.parquet", "a/x.json"]
    assert storage.list_names(storage.join(root, "a")) == ["t.parquet", "x.json"]


def test_empty_folder_makes_an_empty_complete_stage(ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    records = run(tmp_path / "run", tmp_path / "empty")
    assert records["ingest"]["rows"] == 0 and records["ingest"]["shards"] == 0


@pytest.mark.parametrize("shard_size", [1, 4, 100])
def test_shard_size_partitions_without_overlap(ray_cluster, sample_images, tmp_path, shard_size):
    run(tmp_path / "run", sample_images, shard_size=shard_size)
    shards = sorted((tmp_path / "run" / "ingest").glob("shard-*.parquet"))
    n = len(image_files(sample_images))
    assert len(shards) == -(-n // shard_size)
    counts = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    assert sum(counts) == n and max(counts) <= shard_size
