"""`curate serve`: a folder on 127.0.0.1 for exactly as long as a command runs, and the URL list of its images."""

from __future__ import annotations

import sys
import urllib.request

import pyarrow.parquet as pq
import pytest
from conftest import curate_cli

from curate.serve import serve_during, start

FIRST_URL = """
import urllib.request, pyarrow.parquet as pq
url = pq.read_table({urls!r})["url"][0].as_py()
assert urllib.request.urlopen(url).read()
open({out!r}, "w").write(url)
"""


def test_serves_while_the_command_runs_then_stops(sample_images, tmp_path):
    url_list = tmp_path / "urls.parquet"
    fetch = "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen(sys.argv[1]).read() else 3)"
    # while the command runs the folder is served: it downloads the first listed image and notes its URL
    listed = tmp_path / "first-url"
    script = FIRST_URL.format(urls=str(url_list), out=str(listed))
    assert serve_during(sample_images, url_list, [sys.executable, "-c", script], log=lambda line: None) == 0
    table = pq.read_table(url_list)
    files = table["file"].to_pylist()
    assert files == sorted(files) and "astronaut.jpg" in files and not any(f.endswith(".txt") for f in files)
    captions = dict(zip(files, table["caption"].to_pylist(), strict=True))
    assert captions["astronaut.jpg"] == (sample_images / "astronaut.txt").read_text().strip()
    assert captions["coffee-small.jpg"] is None
    url = listed.read_text()
    with pytest.raises(OSError):  # stopped with the command
        urllib.request.urlopen(url, timeout=5)

    code = serve_during(sample_images, url_list, [sys.executable, "-c", fetch, url], log=lambda line: None)
    assert code == 0  # the same port again (the list's), so the same URLs
    assert pq.read_table(url_list)["url"][0].as_py() == url
    assert serve_during(sample_images, url_list, [sys.executable, "-c", "raise SystemExit(7)"], log=print) == 7


def test_cli_needs_a_command_and_loopback(sample_images, tmp_path):
    result = curate_cli("serve", str(sample_images), "--url-list", str(tmp_path / "u.parquet"))
    assert result.returncode == 2 and "give the command to run after --" in result.stderr
    with pytest.raises(FileNotFoundError, match="no such folder"):
        serve_during(tmp_path / "nope", tmp_path / "u.parquet", ["true"])
    with pytest.raises(ValueError, match="loopback"):
        start(sample_images, host="10.0.0.1")
