"""The download stage against real HTTP servers on 127.0.0.1 (allowed) and 127.0.0.2 (must never be contacted).

Every URL's status is asserted, every input row must appear exactly once, the decoy server's request
log must stay empty, and an interrupted run must resume to the same result without re-downloading
finished shards.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_server import Route, image_bytes, serve
from PIL import Image

from curate.config import ConfigError
from curate.download.net import AddressPolicy, parse_networks
from curate.download.statuses import STATUSES, classify, is_documented
from curate.inspect import format_run, read_stage
from curate.pipeline import load_pipeline, parse_pipeline
from curate.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0  # generous: other jobs share these 2 cores, and a good image must never time out


@pytest.fixture(scope="module")
def servers():
    """The allowed server (127.0.0.1) with every case, and a decoy (127.0.0.2) that only logs."""
    routes: dict[str, Route] = {}
    good = serve("127.0.0.1", routes)
    decoy = serve("127.0.0.2", {"/stolen.jpg": Route(image_bytes(64, 64))})
    jpg = image_bytes(320, 240, seed=1)
    routes.update(
        {
            "/robots.txt": Route(b"User-agent: *\nDisallow: /private/\n", content_type="text/plain"),
            "/small.jpg": Route(image_bytes(40, 30, seed=2)),
            "/photo.jpg": Route(jpg),
            "/wide.png": Route(image_bytes(300, 100, "PNG", seed=3), content_type="image/png"),
            "/square.webp": Route(image_bytes(150, 150, "WEBP", seed=4), content_type="image/webp"),
            "/rgba.png": Route(_png(Image.new("RGBA", (80, 60), (255, 0, 0, 0))), content_type="image/png"),
            "/missing.jpg": Route(b"gone", 404, "text/plain"),
            "/error.jpg": Route(b"oops", 500, "text/plain"),
            "/slow.jpg": Route(jpg, delay=TIMEOUT + 2),
            "/trickle.jpg": Route(jpg, trickle=0.05),
            "/truncated.jpg": Route(jpg[: len(jpg) * 2 // 3]),
            "/page.html": Route(b"<html><body>not an image</body></html>", content_type="text/html"),
            "/huge.png": Route(_png(Image.new("RGB", (700, 700), (0, 90, 200))), content_type="image/png"),
            "/noai.jpg": Route(jpg, headers={"X-Robots-Tag": "noai"}),
            "/noimageai.jpg": Route(jpg, headers={"X-Robots-Tag": "img2dataset: noimageai"}),
            "/otherbot.jpg": Route(jpg, headers={"X-Robots-Tag": "otherbot: noai"}),
            "/private/secret.jpg": Route(jpg),
            "/bloated.jpg": Route(jpg + b"\0" * 600_000),
            "/redirect-away": Route(b"", 302, headers={"Location": decoy.url("/stolen.jpg")}),
            "/redirect-home": Route(b"", 301, headers={"Location": good.url("/photo.jpg")}),
            "/redirect-file": Route(b"", 302, headers={"Location": "file:///etc/hostname"}),
            "/tiny.jpg": Route(image_bytes(12, 12, seed=6)),
            "/rotated.jpg": Route(_rotated_jpeg()),
            "/cmyk.jpg": Route(_jpeg(Image.new("CMYK", (90, 70), (0, 200, 200, 0)))),
            "/thin.png": Route(image_bytes(400, 20, "PNG", seed=7), content_type="image/png"),
        }
    )
    yield good, decoy
    good.close()
    decoy.close()


def _rotated_jpeg() -> bytes:
    """Stored 120x80 with EXIF orientation 6 (rotate 90°): the image is 80 wide, 120 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(120, 80, seed=8))).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def expected_cases(good, decoy) -> list[tuple[str | None, str]]:
    """(url, expected status) in list order; the photo appears twice on purpose."""
    return [
        (good.url("/photo.jpg"), "ok"),
        (good.url("/wide.png"), "ok"),
        (good.url("/square.webp"), "ok"),
        (good.url("/small.jpg"), "ok"),
        (good.url("/rgba.png"), "ok"),
        (good.url("/missing.jpg"), "http_404"),
        (good.url("/error.jpg"), "http_500"),
        (good.url("/slow.jpg"), "timeout"),
        (good.url("/trickle.jpg"), "timeout"),
        (good.url("/truncated.jpg"), "truncated"),
        (good.url("/page.html"), "not_an_image"),
        (good.url("/huge.png"), "too_large"),
        (good.url("/noai.jpg"), "opted_out"),
        (good.url("/noimageai.jpg"), "opted_out"),
        (good.url("/otherbot.jpg"), "ok"),
        (good.url("/private/secret.jpg"), "robots_disallowed"),
        (good.url("/bloated.jpg"), "response_too_large"),
        (good.url("/redirect-away"), "blocked_address"),
        (decoy.url("/stolen.jpg"), "blocked_address"),
        (good.url("/redirect-home"), "ok"),
        (good.url("/redirect-file"), "redirect_error"),
        (good.url("/tiny.jpg"), "too_small"),
        (good.url("/thin.png"), "bad_aspect_ratio"),
        ("file:///etc/hostname", "bad_url"),
        ("ftp://127.0.0.1/x.jpg", "bad_url"),
        ("not a url", "bad_url"),
        ("", "bad_url"),
        (None, "bad_url"),
        (good.url("/photo.jpg"), "ok"),
        (f"http://localhost:{good.port}/photo.jpg", "ok"),
        (good.url("/rotated.jpg"), "ok"),
        (good.url("/cmyk.jpg"), "ok"),
    ]


def write_url_list(path: Path, cases: list[tuple[str | None, str]]) -> Path:
    """LAION-style columns: URL, TEXT, and extras (one of which clashes with a fixed column name)."""
    n = len(cases)
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(range(1000, 1000 + n), pa.int64()),
            "URL": pa.array([u for u, _ in cases], pa.string()),
            "TEXT": pa.array([f"caption {i}" for i in range(n)], pa.string()),
            "similarity": pa.array([0.3 + i / 100 for i in range(n)], pa.float64()),
            "status": pa.array(["from the list"] * n, pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=8)
    return path


def pipeline_text(urls: list[str] | str, output: Path, **overrides) -> str:
    stage = {
        "kind": "download",
        "urls": urls,
        "url_column": "URL",
        "caption_column": "TEXT",
        "shard_size": 7,
        "image_size": 64,
        "resize_mode": "border",
        "min_image_size": 16,
        "max_aspect_ratio": 5,
        "max_pixels": 300_000,
        "max_response_bytes": 500_000,
        "timeout": TIMEOUT,
        "thread_count": 8,
        "allow_private_addresses": ["127.0.0.1/32"],
        "resources": {"num_cpus": 1, "concurrency": 2},
        **overrides,
    }
    return json.dumps({"name": "download-test", "output": str(output), "stages": [stage]})


def run(text: str, output: Path) -> pa.Table:
    run_pipeline(parse_pipeline(text, "download-test.yaml"), output=str(output), log=lambda line: None)
    return read_stage(str(output), "download")


@pytest.fixture(scope="module")
def first_run(servers, ray_cluster, tmp_path_factory):
    good, decoy = servers
    folder = tmp_path_factory.mktemp("download")
    cases = expected_cases(good, decoy)
    url_list = write_url_list(folder / "laion.parquet", cases)
    output = folder / "run"
    text = pipeline_text(str(url_list), output)
    good.log.clear()
    table = run(text, output)
    return {"cases": cases, "table": table, "output": output, "text": text, "requests": good.log.paths()}


def test_every_url_has_its_status(first_run):
    table, cases = first_run["table"], first_run["cases"]
    got = list(zip(table["url"].to_pylist(), table["status"].to_pylist(), strict=True))
    assert got == [(url, status) for url, status in cases]  # in input order, each status as expected
    for row in table.to_pylist():
        assert is_documented(row["status"]), row["status"]
        if row["status"] != "ok":
            assert row["image"] is None and row["error"], row


def test_no_row_lost_or_repeated(first_run):
    table, cases = first_run["table"], first_run["cases"]
    assert table["source_row"].to_pylist() == list(range(len(cases)))
    assert table["SAMPLE_ID"].to_pylist() == list(range(1000, 1000 + len(cases)))
    keys = table["key"].to_pylist()
    assert len(set(keys)) == len(keys)  # the repeated photo URL gets its own key


def test_ok_rows_are_resized_images(first_run):
    table = first_run["table"]
    for row in table.to_pylist():
        if row["status"] != "ok":
            continue
        image = Image.open(io.BytesIO(row["image"]))
        assert image.size == (64, 64) and image.format == "JPEG" and row["format"] == "JPEG"
        assert (row["width"], row["height"]) == (64, 64)
        assert row["original_width"] and row["sha256"] and len(row["sha256"]) == 64
    rows: dict[str, dict] = {}
    for row in table.to_pylist():
        if row["url"]:
            rows.setdefault(row["url"].rsplit("/", 1)[-1], row)  # the first of the repeated photo rows
    assert (rows["photo.jpg"]["original_width"], rows["photo.jpg"]["original_height"]) == (320, 240)
    assert rows["photo.jpg"]["caption"] == "caption 0"
    assert (rows["rotated.jpg"]["original_width"], rows["rotated.jpg"]["original_height"]) == (80, 120)
    assert (rows["cmyk.jpg"]["original_width"], rows["cmyk.jpg"]["original_height"]) == (90, 70)
    # border mode pads an upright 80x120 image left and right: the top-middle pixel is photo, the corners white
    rotated = Image.open(io.BytesIO(rows["rotated.jpg"]["image"])).convert("RGB")
    assert min(rotated.getpixel((0, 32))) > 240 and min(rotated.getpixel((32, 2))) < 240
    cmyk = Image.open(io.BytesIO(rows["cmyk.jpg"]["image"])).convert("RGB").getpixel((32, 32))
    assert cmyk[0] > 150 and cmyk[1] < 100 and cmyk[2] < 100  # cyan 0, magenta/yellow 200 -> red-ish


def test_columns_and_schema(first_run):
    table = first_run["table"]
    fixed = [
        "key",
        "url",
        "caption",
        "image",
        "format",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
        "status",
        "error",
    ]
    assert table.column_names == [*fixed, "source", "source_row", "SAMPLE_ID", "similarity", "input_status"]
    assert set(table["input_status"].to_pylist()) == {"from the list"}


def test_blocked_address_was_never_contacted(first_run, servers):
    _, decoy = servers
    assert decoy.log.paths() == []
    requests = first_run["requests"]
    assert 1 <= requests.count("/robots.txt") <= 10  # once per host and worker process, not once per URL
    assert "/private/secret.jpg" not in requests  # robots.txt was honoured before fetching


def test_statistics_in_markers_and_inspect(first_run):
    output = first_run["output"]
    marker = json.loads((output / "download" / "_shards" / "shard-00000.json").read_text())
    assert marker["extra"]["urls"] == 7 and "images_per_second" in marker["extra"]["rates"]
    success = json.loads((output / "download" / "_SUCCESS.json").read_text())
    ok = sum(1 for _, s in first_run["cases"] if s == "ok")
    assert success["status"]["ok"] == ok and success["extra"]["urls"] == len(first_run["cases"])
    text = format_run(str(output), sample=1)
    assert f"{ok} of {len(first_run['cases'])} URLs ok" in text and "images/s per worker" in text
    assert "images/s overall" in text
    assert "timeout 2" in text and "blocked_address 2" in text


def test_interrupted_download_resumes_to_the_same_result(first_run, servers, tmp_path):
    good, decoy = servers
    output = tmp_path / "run"
    shutil.copytree(first_run["output"], output)
    stage = output / "download"
    (stage / "_SUCCESS.json").unlink()
    for shard in (1, 3):  # a kill after these shards started but before their markers
        (stage / "_shards" / f"shard-{shard:05d}.json").unlink()
        (stage / f"shard-{shard:05d}.parquet").unlink()
    (stage / ".tmp-0123-shard-00001.parquet").write_bytes(b"partial")
    good.log.clear()
    table = run(first_run["text"], output)

    before = first_run["table"]
    for column in ("key", "url", "status", "source_row", "image"):
        assert table[column].to_pylist() == before[column].to_pylist(), column
    assert not list(stage.glob(".tmp-*"))
    redone = set(first_run["table"].slice(7, 7)["url"].to_pylist() + first_run["table"].slice(21, 7)["url"].to_pylist())
    requested = {good.url(p) for p in good.log.paths() if p != "/robots.txt"}
    assert requested <= redone  # nothing from a finished shard was downloaded again
    assert good.url("/photo.jpg") not in requested
    assert decoy.log.paths() == []

    good.log.clear()
    again = run(first_run["text"], output)
    assert good.log.paths() == []  # a finished download makes no requests at all
    assert again["key"].to_pylist() == table["key"].to_pylist()


def test_csv_and_jsonl_lists_with_datacomp_columns(servers, ray_cluster, tmp_path):
    good, _ = servers
    photo, png = good.url("/photo.jpg"), good.url("/wide.png")
    (tmp_path / "a.csv").write_text(f'url,text,uid\n{photo},"a, quoted caption",u1\n{good.url("/missing.jpg")},b,u2\n')
    lines = [{"url": png, "text": "c", "uid": "u3"}, {"url": photo, "text": "d", "uid": "u4"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "run"
    text = pipeline_text(
        [str(tmp_path / "a.csv"), str(tmp_path / "*.jsonl")], output, url_column="url", caption_column="text"
    )
    table = run(text, output)
    assert table["status"].to_pylist() == ["ok", "http_404", "ok", "ok"]
    assert table["caption"].to_pylist() == ["a, quoted caption", "b", "c", "d"]
    assert table["uid"].to_pylist() == ["u1", "u2", "u3", "u4"]
    assert table["source"].to_pylist() == [str(tmp_path / "a.csv")] * 2 + [str(tmp_path / "b.jsonl")] * 2
    assert len(set(table["key"].to_pylist())) == 4  # the photo is listed twice


def test_config_errors_before_any_work(tmp_path):
    url_list = write_url_list(tmp_path / "list.parquet", [("http://127.0.0.1:1/a.jpg", "ok")])
    bad = {
        "urls": str(tmp_path / "nope.parquet"),
        "url_column": "url_that_is_not_there",
        "allow_private_addresses": ["127.0.0.1/33"],
    }
    for key, value in bad.items():
        settings = {"urls": str(url_list), key: value}
        text = pipeline_text(settings.pop("urls"), tmp_path / "run", **settings)
        with pytest.raises(ConfigError) as error:
            parse_pipeline(text, "p.yaml")
        assert key in str(error.value), (key, str(error.value))
    text = pipeline_text(str(url_list), tmp_path / "run", encode_format="png", encode_quality=50)
    with pytest.raises(ConfigError, match="encode_quality"):
        parse_pipeline(text, "p.yaml")
    assert not (tmp_path / "run").exists()


def test_laion_pipeline_checks_offline():
    from curate.check import describe

    pipeline = load_pipeline(REPO / "pipelines" / "laion.yaml")
    stage = pipeline.stages[0]
    assert stage.kind == "download" and stage.url_column == "URL" and stage.caption_column == "TEXT"
    assert pipeline.output.startswith("s3://") and "download" in describe(pipeline)


def test_address_policy():
    policy = AddressPolicy(parse_networks(["127.0.0.1/32"]))
    assert policy.problem("127.0.0.1") is None
    for address in ("127.0.0.2", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "::1", "fe80::1"):
        assert policy.problem(address) is not None, address
    for address in ("224.0.0.1", "0.0.0.0", "::ffff:10.0.0.1", "100.64.0.1"):
        assert policy.problem(address) is not None, address
    assert policy.problem("93.184.216.34") is None  # a public address (only evaluated, never contacted)


def test_error_messages_map_to_statuses():
    assert classify("HTTP Error 403: Forbidden") == "http_403"
    assert classify("<urlopen error timed out>") == "timeout"
    assert classify("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert classify("<urlopen error curate:blocked_address: x -> 10.0.0.1>") == "blocked_address"
    assert classify("Use of image disallowed by X-Robots-Tag directive") == "opted_out"
    assert classify("image too small", "resize") == "too_small"
    assert classify("something new", "resize") == "resize_error"
    assert classify("something new") == "download_error"


def _doc_section(title: str) -> str:
    text = (REPO / "docs" / "schema.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/schema.md has no '## {title}' section"
    return match.group(1)


def test_every_status_and_column_is_documented():
    from curate.stages.download import SPEC

    rows = dict(re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+?) \|", _doc_section("download"), re.M))
    assert rows == {field.name: str(field.type) for field in SPEC.schema}  # as main's test_schema_doc checks
    statuses = re.findall(r"^\| `([a-z_0-9<>]+)` \|", _doc_section("Status codes of downloaded rows"), re.M)
    assert statuses == list(STATUSES)


def self_signed(folder: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 made by the openssl command (skips the test when there is none)."""
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_https_goes_through_the_same_guards(tmp_path, monkeypatch, servers):
    """LAION is mostly https: the TLS path must download, keep the deadline and block redirects."""
    from curate.download.fetch import fetch
    from curate.stages.download import DownloadConfig

    _, decoy = servers
    cert, key = self_signed(tmp_path)
    jpg = image_bytes(200, 150, seed=9)
    routes = {
        "/photo.jpg": Route(jpg),
        "/trickle.jpg": Route(jpg, trickle=0.05),
        "/away": Route(b"", 302, headers={"Location": decoy.url("/stolen.jpg")}),
    }
    tls = serve("127.0.0.1", routes, tls=(cert, key))
    try:
        config = DownloadConfig(
            kind="download", urls=[str(tmp_path)], timeout=TIMEOUT, allow_private_addresses=["127.0.0.1"]
        )
        urls = [tls.url("/photo.jpg"), tls.url("/trickle.jpg"), tls.url("/away")]
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # trust the test certificate, as a system CA would be
        results, network = fetch(urls, config.fetch_settings())
        assert [r.status for r in results] == ["ok", "timeout", "blocked_address"], [r.error for r in results]
        assert results[0].original_width == 200 and network["bytes_received"] > len(jpg)
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted, _ = fetch(urls[:1], config.fetch_settings())
        assert untrusted[0].status == "tls_error", untrusted[0].error
        assert decoy.log.paths() == []
    finally:
        tls.close()


def test_plan_cuts_lists_into_exact_row_ranges(tmp_path):
    from curate.download import inputs
    from curate.stages.download import DownloadConfig, plan, task_rows

    shards = inputs.pack([("a", 5), ("b#1", 2), ("c", 0), ("d", 9)], 4)
    assert [[r.encode() for r in shard] for shard in shards] == [
        ["a#0:4"],
        ["a#4:5", "b#1#0:2", "d#0:1"],
        ["d#1:5"],
        ["d#5:9"],
    ]
    assert inputs.RowRange.decode("s3://bucket/x#y.parquet#3:9") == inputs.RowRange("s3://bucket/x#y.parquet", 3, 9)

    # a caption with a newline inside quotes is one row, counted and read the same way
    (tmp_path / "list.csv").write_text('url,caption\nhttp://a/1.jpg,"two\nlines"\nhttp://a/2.jpg,x\n')
    write_url_list(tmp_path / "list.parquet", [(f"http://a/{i}.jpg", "ok") for i in range(5)])
    config = DownloadConfig(kind="download", urls=[str(tmp_path / "list.*")], url_column="url", shard_size=3)
    with pytest.raises(ValueError, match="url"):  # the Parquet list has URL, not url
        plan(config, None)
    config = DownloadConfig(kind="download", urls=[str(tmp_path / "list.csv")], url_column="url", shard_size=3)
    (task,) = plan(config, None)
    assert task.inputs == (f"{tmp_path / 'list.csv'}#0:2",) and task_rows(config, task) == 2
    table = inputs.read_rows(str(tmp_path / "list.csv"), "csv", 0, 2)
    assert table["caption"].to_pylist() == ["two\nlines", "x"]


def test_slow_robots_txt_does_not_eat_the_url_budget(servers):
    """robots.txt is fetched once per host while the URLs wait; their own deadline starts after it."""
    from curate.download.fetch import fetch
    from curate.stages.download import DownloadConfig

    jpg = image_bytes(100, 80, seed=10)
    routes = {
        "/robots.txt": Route(b"User-agent: *\nAllow: /\n", content_type="text/plain", delay=TIMEOUT * 0.6),
        **{f"/{i}.jpg": Route(jpg, delay=TIMEOUT * 0.6) for i in range(4)},
    }
    slow = serve("127.0.0.1", routes)
    try:
        config = DownloadConfig(kind="download", urls=["x"], timeout=TIMEOUT, allow_private_addresses=["127.0.0.1"])
        results, _ = fetch([slow.url(f"/{i}.jpg") for i in range(4)], config.fetch_settings())
        assert [r.status for r in results] == ["ok"] * 4, [r.error for r in results]
        assert slow.log.paths().count("/robots.txt") == 1
    finally:
        slow.close()


def test_lists_that_disagree_on_an_extra_column_type_share_a_shard(tmp_path):
    from curate.stages.download import DownloadConfig, _read_task, plan

    pq.write_table(pa.table({"url": ["http://a/1"], "uid": pa.array([7], pa.int64())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"url": ["http://a/2"], "uid": ["x8"]}), tmp_path / "b.parquet")
    config = DownloadConfig(kind="download", urls=[str(tmp_path / "*.parquet")], caption_column=None)
    (task,) = plan(config, None)
    table = _read_task(config, task)
    assert table["uid"].to_pylist() == ["7", "x8"] and table["source_row"].to_pylist() == [0, 0]
