"""An S3 API server on 127.0.0.1 for the session (moto's standalone server, a real HTTP server speaking the S3
REST API, conditional writes included), used through pyarrow and botocore exactly as a MinIO or AWS endpoint is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "curate-test",
    "AWS_SECRET_ACCESS_KEY": "curate-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never look for instance credentials
}


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> Any:
        import botocore.session

        return botocore.session.get_session().create_client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"curate-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """One moto server per session on a free port; its endpoint and credentials are set in this process's
    environment (pyarrow and botocore read AWS_ENDPOINT_URL) and returned for subprocesses."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    port = None
    while port is None:
        found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found:
            port = int(found.group(1))
        elif process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto's server did not start:\n{log.read_text(errors='replace')[-2000:]}")
        else:
            time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        process.wait(10)
