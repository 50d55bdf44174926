"""One writer per run folder: a lease in `RUN/_lease.json` that `curate run` takes before any work and renews
from a background thread while it runs.

A second run (or a `--redo`, or `curate verify --repair`) on a folder whose lease is fresh stops at once, with
the holder's host, pid and start time. A lease not renewed for its TTL belongs to a run that is gone (a crashed
driver, a lost head node) and the next run takes it over, saying so; so is one whose holder was a process on
this machine that has exited (a SIGKILLed driver: same boot id and pid namespace, its pid gone or reused), at
once. `--take-over` takes any lease at once.

How each store makes taking and renewing atomic (docs/operations.md#one-run-per-folder):
- local disks and shared filesystems: every read-modify-write of the lease holds an exclusive `flock` on
  `RUN/_lease.json.lock` (the kernel drops it when a process dies; NFSv4 maps it to byte-range locks), the
  lease is created with `link()` (fails if it exists) and replaced with `rename()`, so readers never see a
  partial file. Its age is its mtime against this machine's clock.
- S3 and S3-compatible stores with conditional writes (AWS since 2024, MinIO, Ceph RGW, R2): the lease is
  created with `If-None-Match: *` and renewed, taken over and deleted with `If-Match: <ETag>`, through botocore
  (pyarrow's S3 filesystem cannot send these headers; botocore, the AWS SDK's core that boto3 wraps, comes with
  the `cloud` extra, which s3fs already pulls in through aiobotocore). Its age is the
  object's Last-Modified against the Date of the store's reply: both the store's clock, so drivers' clocks
  need not agree. Whether the store honours the headers is probed before each acquisition (a probe object
  written twice with `If-None-Match: *` must be refused the second time).
- any other store (gs://, hdfs://, a store that ignores conditional headers, S3 without botocore): best effort.
  Write the lease, wait `SETTLE_SECONDS`, read it back and hold it only if it is still ours. Two runs that
  both find the folder free within that window of each other can both think they hold it; every later run
  is refused.

Why a lease rather than Ray-level locking: the folder outlives any one cluster, and a second cluster (a
colleague's `ray job submit`) shares nothing with the first but the folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from curate import __version__, storage

LEASE_NAME = "_lease.json"
DEFAULT_TTL_SECONDS = 60.0  # a run that stopped renewing blocks the next one at most this long
DEFAULT_RENEW_SECONDS = 15.0  # four renewals per TTL: three may fail (a slow store, a GC pause) before expiry
SETTLE_SECONDS = 2.0  # best-effort stores: how long to wait before reading a written lease back


class LeaseHeld(Exception):
    """Another run holds the folder's lease; the message says who and how to take over."""


class LeaseLost(Exception):
    """This run's lease was taken over or could not be renewed within its TTL."""


@dataclass(frozen=True)
class Record:
    """A lease as read: its body, the version a conditional write must match, and seconds since it was written
    (on the store's clock where the store tells it)."""

    body: dict[str, Any]
    version: Any
    age: float

    @property
    def ttl(self) -> float:
        return float(self.body.get("ttl_seconds") or DEFAULT_TTL_SECONDS)

    @property
    def expired(self) -> bool:
        return self.age > self.ttl


def _utc(seconds: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if seconds is None else seconds, dt.timezone.utc)
    return moment.isoformat(timespec="seconds")


def describe(record: Record) -> str:
    """Who holds a lease, since when, and how fresh it is."""
    b = record.body
    what = f"`{b['command']}`" if b.get("command") else "a run"
    return (
        f"host {b.get('host', '?')}, pid {b.get('pid', '?')} (user {b.get('user', '?')}), running {what} since "
        f"{b.get('started_at', '?')}; last renewed {record.age:.0f} s ago (it renews every "
        f"{float(b.get('renew_seconds') or DEFAULT_RENEW_SECONDS):g} s; the lease expires {record.ttl:g} s after "
        f"its last renewal)"
    )


# ---------------------------------------------------------------------------------------------------- backends


class LocalBackend:
    """A lease file on a filesystem this machine mounts; read-modify-writes under an exclusive flock."""

    mode = "local file: flock + link/rename"

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # a filesystem without locks (some FUSE mounts): link/rename alone
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> Record | None:
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        return Record(body, (body.get("holder"), body.get("sequence")), max(0.0, time.time() - stat.st_mtime))

    def _temporary(self, body: dict[str, Any]) -> str:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(json.dumps(body, indent=2).encode())
        return tmp

    def read(self) -> Record | None:
        return self._read()

    def create(self, body: dict[str, Any]) -> Any:
        with self._locked():
            tmp = self._temporary(body)
            try:
                os.link(tmp, self.path)  # fails if the lease exists, even where flock is not honoured
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
            return (body["holder"], body["sequence"])

    def replace(self, body: dict[str, Any], version: Any) -> Any:
        with self._locked():
            current = self._read()
            if current is None or current.version != version:
                return None
            os.replace(self._temporary(body), self.path)
            return (body["holder"], body["sequence"])

    def delete(self, version: Any) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current.version != version:
                return False
            os.unlink(self.path)
            return True


class S3Backend:
    """A lease object written with S3 conditional requests (If-None-Match / If-Match), through botocore."""

    mode = "S3 conditional writes (If-None-Match / If-Match)"

    def __init__(self, bucket: str, key: str, client: Any = None):
        import botocore.session

        self.bucket, self.key = bucket, key
        # endpoint, region and credentials from AWS_ENDPOINT_URL and the other AWS_* variables, as pyarrow reads them
        self.client = client or botocore.session.get_session().create_client("s3")

    @staticmethod
    def _code(error: Exception) -> tuple[str, int]:
        response = getattr(error, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        return code, int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)

    def _lost_race(self, error: Exception) -> bool:
        """412 Precondition Failed; 409 ConditionalRequestConflict (a concurrent conditional write); 404."""
        code, status = self._code(error)
        return status in (409, 412, 404) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")

    def _put(self, body: dict[str, Any], **condition: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(body, indent=2).encode(), **condition
            )
        except ClientError as e:
            if self._lost_race(e):
                return None
            raise
        return reply["ETag"]

    def honours_conditions(self) -> bool:
        """Write a probe object twice with If-None-Match: *; a store that honours it refuses the second."""
        from botocore.exceptions import ClientError

        probe = f"{self.key}.probe-{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
            except ClientError as e:
                return self._lost_race(e)
            return False
        finally:
            with contextlib.suppress(ClientError):
                self.client.delete_object(Bucket=self.bucket, Key=probe)

    def read(self) -> Record | None:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e)[1] == 404 or self._code(e)[0] == "NoSuchKey":
                return None
            raise
        data = reply["Body"].read()
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        now = _reply_date(reply) or dt.datetime.now(dt.timezone.utc)
        return Record(body, reply["ETag"], max(0.0, (now - reply["LastModified"]).total_seconds()))

    def create(self, body: dict[str, Any]) -> Any:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: dict[str, Any], version: Any) -> Any:
        return self._put(body, IfMatch=version)

    def delete(self, version: Any) -> bool:
        from botocore.exceptions import ClientError, ParamValidationError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except ParamValidationError:  # a botocore from before conditional deletes (S3 has them since 2025-09)
            pass
        except ClientError as e:
            if self._lost_race(e):
                return False
            code, status = self._code(e)
            if status not in (400, 501) and code not in ("NotImplemented", "InvalidArgument"):
                raise
        current = self.read()  # a store without conditional deletes: check, then delete (a short race)
        if current is None or current.version != version:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True


def _reply_date(reply: dict[str, Any]) -> dt.datetime | None:
    from email.utils import parsedate_to_datetime

    header = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(header) if header else None
    except (TypeError, ValueError):
        return None


class BestEffortBackend:
    """Any store curate.storage reaches, without atomic create or compare-and-swap: write, wait, read back."""

    mode = "best effort: write, wait, read back (this store offers no conditional writes)"

    def __init__(self, uri: str, settle: float = SETTLE_SECONDS):
        self.uri, self.settle = uri, settle

    def read(self) -> Record | None:
        import pyarrow.fs as pafs

        fs, path = storage.resolve(self.uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            body = json.loads(storage.read_bytes(self.uri))
        except (ValueError, FileNotFoundError):
            return None
        written = info.mtime.timestamp() if info.mtime is not None else _parse(body.get("renewed_at"))
        return Record(body, (body.get("holder"), body.get("sequence")), max(0.0, time.time() - written))

    def _write_and_check(self, body: dict[str, Any]) -> Any:
        storage.write_json(self.uri, body)
        time.sleep(self.settle)
        current = self.read()
        mine = (body["holder"], body["sequence"])
        return mine if current is not None and current.version == mine else None

    def create(self, body: dict[str, Any]) -> Any:
        return None if self.read() is not None else self._write_and_check(body)

    def replace(self, body: dict[str, Any], version: Any) -> Any:
        current = self.read()
        if current is None or current.version != version:
            return None
        if current.body.get("holder") == body["holder"]:  # a renewal: no one else may write now
            storage.write_json(self.uri, body)
            return (body["holder"], body["sequence"])
        return self._write_and_check(body)

    def delete(self, version: Any) -> bool:
        current = self.read()
        if current is None or current.version != version:
            return False
        fs, path = storage.resolve(self.uri)
        fs.delete_file(path)
        return True


def _parse(stamp: Any) -> float:
    try:
        return dt.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0


Backend = LocalBackend | S3Backend | BestEffortBackend


def lease_uri(run_uri: str) -> str:
    return storage.join(run_uri, LEASE_NAME)


def backend_for(run_uri: str, log: Callable[[str], None] | None = None, probe: bool = False) -> Backend:
    """The strongest protocol the run folder's store offers (see the module's docstring)."""
    uri = lease_uri(run_uri)
    if storage.is_local(uri):
        return LocalBackend(storage.resolve(uri)[1])
    scheme, rest = uri.split("://", 1)
    if scheme.lower() == "s3":
        try:
            backend = S3Backend(*rest.split("/", 1))
        except ImportError:
            if log:
                log(f"lease: botocore is not installed (pip install 'curate[cloud]'); {BestEffortBackend.mode}")
            return BestEffortBackend(uri)
        if not probe or backend.honours_conditions():
            return backend
        if log:
            log(f"lease: the store at {run_uri} ignores If-None-Match; {BestEffortBackend.mode}")
    return BestEffortBackend(uri)


def read_lease(run_uri: str) -> Record | None:
    """The folder's lease as it stands (for `curate inspect`), or None."""
    return backend_for(run_uri).read()


# ---------------------------------------------------------------------------------------------------- holding


def _read_proc(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): tells a reused pid apart."""
    stat = _read_proc(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _machine() -> str | None:
    """This kernel and pid namespace (boot id + namespace inode): where a pid means the same process."""
    boot = _read_proc("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def holder_is_gone(body: dict[str, Any]) -> bool:
    """Whether the holder was a process on this machine (same kernel boot, same pid namespace) that has exited:
    then its lease is free at once, without waiting for the TTL (a SIGKILLed or crashed local driver)."""
    here = _machine()
    if here is None or body.get("machine") != here or not isinstance(body.get("pid"), int):
        return False
    started = _start_ticks(body["pid"])
    return started is None or started != body.get("pid_start")


def _command() -> str:
    text = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)) or "python"
    return text if len(text) <= 300 else text[:299] + "…"


class Lease:
    """A lease this process holds, renewed on a daemon thread until `release`.

    When a renewal finds the lease taken over (or cannot renew it for a whole TTL), `lost` says why and
    `on_lost` is called from the renewing thread (the runner interrupts its main thread with it)."""

    def __init__(self, backend: Backend, body: dict[str, Any], version: Any, on_lost: Callable[[str], None]):
        self.backend, self.body, self.version, self.on_lost = backend, body, version, on_lost
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="curate-lease", daemon=True)

    @property
    def renew_seconds(self) -> float:
        return float(self.body["renew_seconds"])

    def start(self) -> Lease:
        self._thread.start()
        return self

    def renew(self) -> bool:
        """One renewal; False when the lease is no longer ours."""
        body = {**self.body, "sequence": self.body["sequence"] + 1, "renewed_at": _utc()}
        version = self.backend.replace(body, self.version)
        if version is None:
            return False
        self.body, self.version = body, version
        return True

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.renew_seconds):
            try:
                if self.renew():
                    last_ok = time.monotonic()
                    continue
                current = self.backend.read()
                who = describe(current) if current is not None else "no one (the lease was deleted)"
                reason = f"the lease was taken over; it is now held by {who}"
            except Exception as e:  # a store that does not answer: keep trying until the TTL runs out
                if time.monotonic() - last_ok <= float(self.body["ttl_seconds"]):
                    continue
                reason = f"it could not be renewed for {time.monotonic() - last_ok:.0f} s ({e})"
            self.lost = reason
            self.on_lost(reason)
            return

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.lost is None:
            with contextlib.suppress(Exception):  # an expired lease left behind is taken over after its TTL
                self.backend.delete(self.version)


def acquire(
    run_uri: str,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    renew_seconds: float = DEFAULT_RENEW_SECONDS,
    take_over: bool = False,
    purpose: str = "run",
    log: Callable[[str], None] = print,
    on_lost: Callable[[str], None] = lambda reason: None,
) -> Lease:
    """Take the run folder's lease (raises LeaseHeld when another run holds a fresh one) and start renewing it."""
    backend = backend_for(run_uri, log, probe=True)
    now = _utc()
    body = {
        "holder": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": getpass.getuser(),
        "command": _command(),
        "purpose": purpose,
        "machine": _machine(),
        "pid_start": _start_ticks(os.getpid()),
        "started_at": now,
        "renewed_at": now,
        "ttl_seconds": ttl_seconds,
        "renew_seconds": renew_seconds,
        "sequence": 0,
        "curate_version": __version__,
        "protocol": backend.mode,
    }
    for _ in range(5):  # a conditional write lost to a concurrent one: read again and decide again
        current = backend.read()
        if current is None:
            version = backend.create(body)
        elif current.expired or take_over or holder_is_gone(current.body):
            why = "past its TTL: that run stopped renewing (a crashed driver or a lost head node)"
            if not current.expired:
                why = "because --take-over was given"
            if not current.expired and holder_is_gone(current.body):
                why = "because its process no longer exists on this machine (a killed or crashed driver)"
            log(f"lease: taking over the run folder {run_uri} from {describe(current)}, {why}")
            version = backend.replace(body, current.version)
        else:
            wait = max(0.0, current.ttl - current.age)
            raise LeaseHeld(
                f"run folder {run_uri} is in use by another curate run: {describe(current)}. Wait for that run to "
                f"end, or stop it. If it is gone (a crashed driver, a lost head node), a run started after its lease "
                f"expires (in {wait:.0f} s) takes over; `--take-over` takes over now (only when you know it is gone: "
                f"two runs on one folder redo each other's shards, and a --redo deletes what the other writes)."
            )
        if version is not None:
            return Lease(backend, body, version, on_lost).start()
    raise LeaseHeld(f"run folder {run_uri}: the lease kept changing while it was being taken; try again")


def _interrupt_main(reason: str) -> None:
    """Stop the run's main thread as Ctrl-C would when its lease is gone (`holding` turns that into LeaseLost): a
    real SIGINT, which also breaks a blocking wait (`_thread.interrupt_main` only takes effect at the next
    bytecode)."""
    import signal

    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


@contextlib.contextmanager
def holding(
    run_uri: str,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    renew_seconds: float = DEFAULT_RENEW_SECONDS,
    take_over: bool = False,
    log: Callable[[str], None] = print,
) -> Iterator[Lease]:
    """Hold the folder's lease for the block; released at its end, errors and interrupts included. If the lease
    is lost meanwhile, the main thread is interrupted and the block ends with LeaseLost."""
    import signal

    in_main = threading.current_thread() is threading.main_thread()
    # a process started in the background (`cmd &` in a script, nohup) ignores SIGINT: the interrupt that ends the
    # block on a lost lease needs a handler for the block's duration
    ignored = in_main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        lease = acquire(run_uri, ttl_seconds, renew_seconds, take_over, log=log,
                        on_lost=_interrupt_main if in_main else log)  # fmt: skip
        try:
            yield lease
        except BaseException as e:
            if lease.lost is not None:
                raise LeaseLost(f"this run lost its lease on {run_uri} and stopped: {lease.lost}") from e
            raise
        finally:
            lease.release()
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
