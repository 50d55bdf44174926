"""The `webdataset` and `parquet` sources: img2dataset's own tars and tables (downloaded from a server on
127.0.0.1), hand-made broken tars, and a Hugging Face datasets table. Every member and every URL of the
original list appears exactly once, with the right status; keys are stable across runs; a killed run
resumes to exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate_cli
from download_server import Route, image_bytes, serve
from PIL import Image

from curate.config import ConfigError
from curate.download.statuses import is_documented
from curate.inspect import format_run, read_stage
from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

GOOD = [(f"/{i}.jpg", image_bytes(120 + 10 * i, 90, seed=i)) for i in range(7)] + [
    ("/wide.png", image_bytes(200, 60, "PNG", seed=20)),
    ("/square.webp", image_bytes(70, 70, "WEBP", seed=21)),
]
BAD = {"/page.html": "decode_error", "/missing.jpg": "http_404"}


@pytest.fixture(scope="module")
def img2dataset_downloads(ray_cluster, tmp_path_factory):
    """One img2dataset download of a small list in each of its formats, from a server on 127.0.0.1 (img2dataset's
    Ray distributor on the session's Ray, so no process pool has to start)."""
    import img2dataset

    folder = tmp_path_factory.mktemp("img2dataset")
    routes = {path: Route(body) for path, body in GOOD}
    routes["/page.html"] = Route(b"<html><body>not an image</body></html>", content_type="text/html")
    server = serve("127.0.0.1", routes)
    paths = [p for p, _ in GOOD] + list(BAD)
    urls = [server.url(p) for p in paths]
    captions = [f"caption of {p}" for p in paths]
    table = pa.table({"url": urls, "caption": captions, "uid": [f"u{i}" for i in range(len(urls))]})
    pq.write_table(table, folder / "list.parquet")
    out = {}
    try:
        for fmt in ("webdataset", "parquet"):
            out[fmt] = folder / fmt
            img2dataset.download(
                url_list=str(folder / "list.parquet"),
                input_format="parquet",
                url_col="url",
                caption_col="caption",
                save_additional_columns=["uid"],
                output_folder=str(out[fmt]),
                output_format=fmt,
                image_size=64,
                resize_mode="keep_ratio",
                number_sample_per_shard=4,
                processes_count=1,
                thread_count=4,
                timeout=5,
                distributor="ray",
                enable_wandb=False,
            )
    finally:
        server.close()
    expected = {url: BAD.get(path, "ok") for url, path in zip(urls, paths, strict=True)}
    return {"list": table, "expected": expected, **out}


def run_source(stage: dict, output: Path) -> pa.Table:
    text = json.dumps({"name": "sources", "output": str(output), "stages": [{"name": "ingest", **stage}]})
    run_pipeline(parse_pipeline(text, "sources.yaml"), log=lambda line: None)
    return read_stage(str(output), "ingest")


def test_img2dataset_tars_give_every_url_once(img2dataset_downloads, tmp_path):
    d = img2dataset_downloads
    table = run_source({"kind": "webdataset", "path": f"{d['webdataset']}/{{00000..00002}}.tar"}, tmp_path / "run")
    rows = table.to_pylist()
    assert Counter(r["url"] for r in rows) == Counter(list(d["expected"]))  # every URL of the list once, no other row
    for row in rows:
        assert row["status"] == d["expected"][row["url"]], row
        assert is_documented(row["status"]) or row["status"] == "ok"
        assert row["caption"] == d["list"]["caption"][d["list"]["url"].to_pylist().index(row["url"])].as_py()
        assert row["uid"] and row["source"].endswith(".tar") and row["source_key"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["image"] and r["sha256"] and r["format"] == "JPEG" and min(r["width"], r["height"]) == 64 for r in ok)
    wide = next(r for r in ok if r["url"].endswith("/wide.png"))
    assert (wide["original_width"], wide["original_height"]) == (200, 60)  # img2dataset's size before its resize
    assert (wide["width"], wide["height"]) == (213, 64)  # keep_ratio: shorter side 64
    assert all(r["source_members"] == [] for r in rows if r["status"] != "ok")  # from img2dataset's sidecar
    assert len({r["key"] for r in rows}) == len(rows)
    assert "input_status" in table.column_names and "exif" in table.column_names  # the .json fields


def test_img2dataset_parquet_gives_the_same_images(img2dataset_downloads, tmp_path):
    d = img2dataset_downloads
    stage = {"kind": "parquet", "path": f"{d['parquet']}/*.parquet", "image_column": "jpg", "url_column": "url"}
    table = run_source(stage, tmp_path / "run")
    rows = {r["url"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(d["expected"]) and table.num_rows == len(d["expected"])
    assert {url: r["status"] for url, r in rows.items()} == d["expected"]
    tars = run_source({"kind": "webdataset", "path": f"{d['webdataset']}/*.tar"}, tmp_path / "tars")
    for row in tars.to_pylist():
        assert rows[row["url"]]["sha256"] == row["sha256"]  # the same bytes img2dataset wrote into the tars
    assert set(table["source_row"].to_pylist()) <= set(range(4)) and "uid" in table.column_names


# ---------------------------------------------------------------------------------------------------- broken tars


def _jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    return image_bytes(*size, seed=seed)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 128, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024

# (member name, data, the status of the row it belongs to)
BROKEN = [
    ("s/good.jpg", _jpeg(1), "ok"),
    ("s/good.txt", b"a good caption\n", "ok"),
    ("s/good.json", json.dumps({"url": "http://example.com/good.jpg", "score": 0.5}).encode(), "ok"),
    ("s/orphan.txt", b"a caption without an image", "no_image"),
    ("s/meta.json", b'{"score": 1}', "no_image"),
    ("s/html.jpg", b"<html>not an image</html>", "decode_error"),
    ("s/good.jpg", _jpeg(2), "duplicate_key"),  # the key again, later in the tar
    ("s/pic.png", _png(), "ok"),
    ("s/pic.txt", b"pic", "ok"),
    ("s/pic.png", _png(), "duplicate_key"),  # an extension repeated inside one run of the key
    ("README", b"no extension at all", "no_image"),
    ("s/empty.webp", b"", "empty_file"),
]
AFTER_JUNK = [("s/after.jpg", _jpeg(3), "ok"), ("s/after.txt", b"after the junk", "ok")]


def broken_tars(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Tars with every kind of damage; returns tar name -> [(member name, expected status)] in tar order."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list[tuple[str, str]]] = {}
    junk = b"this is not a tar header. " * 40
    junk = junk[:1024]
    body = b"".join(member(n, d) for n, d, _ in BROKEN) + junk + b"".join(member(n, d) for n, d, _ in AFTER_JUNK)
    (folder / "broken.tar").write_bytes(body + END + b"trailing bytes" + b"\0" * 498)
    expected["broken.tar"] = [(n, s) for n, d, s in BROKEN + AFTER_JUNK]

    big = _jpeg(4, (300, 200))
    whole = member("t/first.jpg", _jpeg(5)) + member("t/first.txt", b"first") + member("t/big.jpg", big)
    cut = len(whole) - 512 * ((len(big) + 511) // 512) + len(big) // 2  # inside big.jpg's data
    (folder / "cut-data.tar").write_bytes(whole[:cut])
    expected["cut-data.tar"] = [("t/first.jpg", "ok"), ("t/first.txt", "ok"), ("t/big.jpg", "truncated_tar")]

    head = member("h/a.jpg", _jpeg(6)) + member("h/b.jpg", _jpeg(7))
    (folder / "cut-header.tar").write_bytes(head[: len(member("h/a.jpg", _jpeg(6))) + 100])
    expected["cut-header.tar"] = [("h/a.jpg", "ok")]

    (folder / "no-end.tar").write_bytes(member("n/a.jpg", _jpeg(8)))
    expected["no-end.tar"] = [("n/a.jpg", "ok")]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:  # long, non-ASCII names
        for i in range(4):
            for extension, data in (("jpg", _jpeg(10 + i)), ("txt", "légende".encode())):
                info = tarfile.TarInfo(f"{'p' * 120}/é-{i}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "pax.tar").write_bytes(buffer.getvalue())
    expected["pax.tar"] = [(f"{'p' * 120}/é-{i}.{e}", "ok") for i in range(4) for e in ("jpg", "txt")]
    (folder / "not-a-tar.tar").write_bytes(b"just some text, " * 100)
    expected["not-a-tar.tar"] = []
    (folder / "empty.tar").write_bytes(b"")
    expected["empty.tar"] = []
    return expected


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tars")
    return folder, broken_tars(folder)


def test_every_member_once_with_its_status(ray_cluster, broken, tmp_path):
    folder, expected = broken
    table = run_source({"kind": "webdataset", "path": f"{folder}/*.tar", "threads": 2}, tmp_path / "run")
    rows = table.to_pylist()
    for name, members in expected.items():
        mine = [r for r in rows if r["source"].endswith("/" + name)]
        found = Counter((m, r["status"]) for r in mine for m in r["source_members"])
        assert found == Counter(members), name  # each member in exactly one row, with its status
    regions = Counter((r["source"].rsplit("/", 1)[1], r["status"]) for r in rows if not r["source_members"])
    assert regions == {
        ("broken.tar", "corrupt_tar"): 2,  # the junk between members, the bytes after the end marker
        ("cut-header.tar", "truncated_tar"): 1,
        ("not-a-tar.tar", "not_a_tar"): 1,
        ("empty.tar", "not_a_tar"): 1,
    }
    good = next(r for r in rows if r["source_key"] == "s/good" and r["status"] == "ok")
    assert good["caption"] == "a good caption" and good["url"] == "http://example.com/good.jpg"
    assert good["score"] == 0.5 and good["image"] == BROKEN[0][1]
    after = next(r for r in rows if r["source_key"] == "s/after")
    assert after["status"] == "ok" and after["caption"] == "after the junk"  # found again after the junk
    assert all(r["error"] for r in rows if r["status"] != "ok")
    keys = table["key"].to_pylist()
    assert len(set(keys)) == len(keys)
    again = run_source({"kind": "webdataset", "path": f"{folder}/*.tar", "threads": 1}, tmp_path / "again")
    assert sorted(again["key"].to_pylist()) == sorted(keys)  # stable across runs
    marker = json.loads((tmp_path / "run" / "ingest" / "_SUCCESS.json").read_text())
    assert marker["extra"]["tar_end_no_end_marker"] == 1 and marker["extra"]["tar_end_truncated"] == 2


def test_large_tars_split_into_parts_with_the_same_rows(ray_cluster, broken, tmp_path):
    folder, _ = broken
    tars = [str(folder / "broken.tar"), str(folder / "pax.tar")]
    whole = run_source({"kind": "webdataset", "path": tars}, tmp_path / "whole")
    parts = run_source({"kind": "webdataset", "path": tars, "max_part_bytes": 2048}, tmp_path / "parts")
    assert len(list((tmp_path / "parts" / "ingest").glob("shard-*.parquet"))) >= 6
    columns = ["key", "status", "source_members", "caption", "sha256"]
    assert sorted(parts.select(columns).to_pylist(), key=str) == sorted(whole.select(columns).to_pylist(), key=str)


def test_checks_name_missing_inputs_before_any_work(tmp_path):
    cases = {
        json.dumps({"kind": "webdataset", "path": str(tmp_path / "nope-{0..3}.tar")}): "path[0]: no such file",
        json.dumps({"kind": "webdataset", "path": str(tmp_path / "*.tar")}): "path[0]: no file matches",
    }
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": [b"x"], "text": ["c"], "n": [1]}), table)
    base = {"kind": "parquet", "path": str(table), "image_column": "img", "caption_column": "text"}
    cases[json.dumps({**base, "caption_column": "caption"})] = "caption_column: no column 'caption'"
    cases[json.dumps({**base, "image_column": "n"})] = "image_column: " + str(table) + ": column 'n' is int64"
    cases[json.dumps({**base, "extra_columns": ["n", "zz"]})] = "extra_columns: no column 'zz'"
    for stage, message in cases.items():
        text = json.dumps({"name": "c", "output": str(tmp_path / "run"), "stages": [json.loads(stage)]})
        with pytest.raises(ConfigError) as error:
            parse_pipeline(text, "c.yaml")
        assert message in str(error.value), (message, str(error.value))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- Parquet tables


def test_hugging_face_image_table(ray_cluster, tmp_path):
    """A table written by Hugging Face `datasets` with an `Image` feature (struct<bytes, path>), and the same
    layout with bytes null and a path to a file, as `datasets` writes when images stay external."""
    datasets = pytest.importorskip("datasets")

    images = [Image.open(io.BytesIO(_jpeg(i, (50 + i, 40)))) for i in range(5)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "n": datasets.Value("int32")}
    )
    data = {"image": [*images, None], "text": [f"t{i}" for i in range(6)], "n": list(range(6))}
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "hf.parquet"), batch_size=2)
    assert pq.ParquetFile(tmp_path / "hf.parquet").metadata.num_row_groups == 3
    (tmp_path / "side.jpg").write_bytes(_jpeg(9))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": "side.jpg"}, {"bytes": None, "path": "gone.jpg"}, {"bytes": b"junk", "path": None}]
    n = pa.array([6, 7, 8], pa.int32())
    pq.write_table(
        pa.table({"image": pa.array(cells, struct), "text": ["a", "b", "c"], "n": n}), tmp_path / "paths.parquet"
    )

    stage = {"kind": "parquet", "path": [str(tmp_path / "hf.parquet"), str(tmp_path / "paths.parquet")],
             "caption_column": "text", "shard_size": 4}  # fmt: skip
    table = run_source(stage, tmp_path / "run")
    assert table["status"].to_pylist() == ["ok"] * 5 + ["no_image", "ok", "read_error", "decode_error"]
    assert table["caption"].to_pylist() == [f"t{i}" for i in range(6)] + ["a", "b", "c"]
    assert table["n"].to_pylist() == list(range(9)) and table.schema.field("n").type == pa.int32()
    assert table["source_row"].to_pylist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert [w for w in table["width"].to_pylist()[:5]] == [50, 51, 52, 53, 54]
    # row groups of 2 packed up to 4 rows: [0:4], [4:6] + the 3-row file as one group (which fits alone)
    shards = sorted((tmp_path / "run" / "ingest").glob("shard-*.parquet"))
    assert [pq.ParquetFile(s).metadata.num_rows for s in shards] == [4, 2, 3]
    assert "parquet" in format_run(str(tmp_path / "run"), sample=1)


# ---------------------------------------------------------------------------------------------------- resume


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(ray_cluster, tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    for t in range(24):
        body = b"".join(member(f"{t:03d}{i:03d}.jpg", _jpeg(t * 10 + i)) + member(f"{t:03d}{i:03d}.txt", b"c")
                        for i in range(6))  # fmt: skip
        (folder / f"{t:05d}.tar").write_bytes(body + END)
    (folder / "00003.tar").write_bytes((folder / "00003.tar").read_bytes()[:1000])  # one tar cut inside its first image

    def pipeline(name: str) -> Path:
        stage = {"kind": "webdataset", "name": "ingest", "path": f"{folder}/{{00000..00023}}.tar",
                 "resources": {"num_cpus": 1, "concurrency": 1}}  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({"name": name, "output": str(tmp_path / name), "stages": [stage]}))
        return path

    stage = json.loads(pipeline("reference").read_text())["stages"][0]
    run_source(stage, tmp_path / "reference")  # uninterrupted, in this process
    run = tmp_path / "killed"
    markers = run / "ingest" / "_shards"
    process = subprocess.Popen(
        [sys.executable, "-m", "curate.cli", "run", str(pipeline("killed")), "--address", ray_cluster],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not markers.is_dir() or len(os.listdir(markers)) < 2):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(os.listdir(markers))
    assert 2 <= done_at_kill < 24, "the run finished before it could be killed; give it more work"
    result = curate_cli("run", str(pipeline("killed")), "--address", ray_cluster)
    assert result.returncode == 0, result.stderr

    def rows(name: str) -> list[tuple]:
        table = read_stage(str(tmp_path / name), "ingest")
        return sorted(zip(*(table[c].to_pylist() for c in ("key", "status", "sha256", "source")), strict=True))

    assert rows("killed") == rows("reference") and len(rows("reference")) > 23 * 6
    assert Counter(s for _, s, _, _ in rows("killed"))["truncated_tar"] == 1


def test_tars_on_another_filesystem_through_the_storage_layer(broken):
    """The reading code goes through curate.storage: here fsspec's memory:// (what s3://, gs:// go through too),
    with a brace list, a split tar and the sidecar lookup."""
    from curate import storage
    from curate.ingest.tar_plan import plan_tars
    from curate.ingest.webdataset import TarSettings, read_part

    folder, expected = broken
    root = "memory://curate-sources/tars"
    for name in ("broken.tar", "pax.tar"):
        storage.write_atomic(f"{root}/{name}", (folder / name).read_bytes())
    parts = plan_tars(storage.expand([f"{root}/{{broken,pax}}.tar"]), max_part_bytes=4096)
    assert {p.uri for p in parts} == {f"{root}/broken.tar", f"{root}/pax.tar"} and len(parts) > 2
    found = Counter()
    for part in parts:
        rows = read_part(part, TarSettings(threads=1), lambda status, message: "unused").rows
        found.update((r["source"].rsplit("/", 1)[1], m, r["status"]) for r in rows for m in r["source_members"])
    assert found == Counter((name, m, s) for name in ("broken.tar", "pax.tar") for m, s in expected[name])
