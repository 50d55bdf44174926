"""`curate serve`: a folder of images served over HTTP on 127.0.0.1 for exactly as long as one command runs,
and the URL list of its images written for the `download` stage.

This is how the offline demo runs the real download path (img2dataset, the address guards, robots.txt)
without the internet: `curate serve demo-data/images --url-list demo-data/urls.parquet -- curate run
pipelines/demo.yaml`. The server is Python's `http.server` (static files, GET and HEAD only, no directory
listings of anything outside the folder); it binds a loopback address only.
"""

from __future__ import annotations

import functools
import ipaddress
import posixpath
import subprocess
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # img2dataset opens many connections at once


def start(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve ``folder`` on ``host:port`` (0: a free port) from a daemon thread; loopback addresses only."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"curate serve binds loopback addresses only, not {host}")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = _Server((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="curate-serve").start()
    return server


def previous_port(url_list: Path, host: str) -> int | None:
    """The port an earlier `curate serve` wrote into the list, so a resumed run downloads the same URLs
    (the download stage's keys come from the URLs)."""
    try:
        first = pq.read_table(url_list, columns=["url"])["url"][0].as_py()
    except Exception:
        return None
    parts = urllib.parse.urlsplit(first or "")
    return parts.port if parts.hostname == host else None


def bind(folder: Path, host: str, port: int, url_list: Path) -> ThreadingHTTPServer:
    """The port asked for; else the one the list already names, if free; else a free one."""
    if port == 0:
        again = previous_port(url_list, host)
        if again:
            try:
                return start(folder, host, again)
            except OSError:
                pass
    return start(folder, host, port)


def write_url_list(folder: str | Path, base_url: str, url_list: str | Path) -> int:
    """One row per image file below ``folder`` (sorted): url, caption (a same-named .txt file, else null) and
    file (its path below the folder). Returns the number of rows."""
    folder = Path(folder)
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    captions = []
    for name in files:
        text = folder / (posixpath.splitext(name)[0] + ".txt")
        captions.append(text.read_text(errors="replace").strip() if text.is_file() else None)
    urls = [base_url.rstrip("/") + "/" + urllib.parse.quote(name) for name in files]
    table = pa.table({"url": urls, "caption": pa.array(captions, pa.string()), "file": files})
    Path(url_list).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, url_list)
    return len(files)


def serve_during(
    folder: str | Path, url_list: str | Path, command: Sequence[str], host: str = "127.0.0.1", port: int = 0, log=print
) -> int:
    """Serve the folder, write its URL list, run the command, stop serving; returns the command's exit code."""
    folder, url_list = Path(folder), Path(url_list)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    server = bind(folder, host, port, url_list)
    base = f"http://{host}:{server.server_address[1]}"
    try:
        count = write_url_list(folder, base, url_list)
        log(f"curate serve: {count} images of {folder} at {base}/ (URL list {url_list}) until the command ends")
        try:
            return subprocess.run(list(command), check=False).returncode
        except KeyboardInterrupt:
            return 130
    finally:
        server.shutdown()
        server.server_close()
        log(f"curate serve: stopped {base}")
