"""A urllib opener that is safe to point at URLs from the open web.

img2dataset fetches every image with ``urllib.request.urlopen``, which uses the process-wide opener.
`install` puts ours there for the duration of a shard, so img2dataset's own download code runs
unchanged while every connection it makes (the first one and every redirect) goes through here:

- DNS is resolved here, every resolved address is checked against `AddressPolicy`, and the socket
  connects to the checked address itself (no second lookup, so DNS rebinding cannot slip past);
  the connected peer is checked again.
- Only http and https are handled: file://, ftp:// and data: URLs (also as redirect targets) fail.
  Proxies from the environment are not used (the proxy would pick the address, not us).
- One deadline covers a URL from its first byte to its last, redirects and robots.txt included:
  each socket operation waits at most until the deadline, so a server that trickles bytes cannot
  hold a thread past it. Each response is capped at ``max_bytes`` (headers and body).

Failures are raised as `GuardError` subclasses whose message starts with ``curate:<status>:``, so the
status survives img2dataset turning exceptions into strings (see curate.download.statuses).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import ipaddress
import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class GuardError(OSError):
    """A request stopped by a safety rule; ``status`` is the row status it becomes."""

    status = "download_error"

    def __init__(self, message: str):
        super().__init__(f"curate:{self.status}: {message}")


class BlockedAddress(GuardError):
    status = "blocked_address"


class DeadlineExceeded(GuardError):
    status = "timeout"


class ResponseTooLarge(GuardError):
    status = "response_too_large"


class RobotsDisallowed(GuardError):
    status = "robots_disallowed"


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """'127.0.0.1', '10.0.0.0/8', '::1' -> networks; raises ValueError naming the bad entry."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


@dataclass(frozen=True)
class AddressPolicy:
    """Which peer addresses may be contacted: public unicast only, plus an explicit allow list."""

    allow: tuple[IPNetwork, ...] = ()

    def problem(self, address: str) -> str | None:
        """None if the address may be contacted, else why not."""
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow if net.version == ip.version):
            return None
        for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
            if getattr(ip, f"is_{kind}"):
                return f"{ip} is a {kind.replace('_', '-')} address"
        if not ip.is_global:
            return f"{ip} is not a public address"
        return None

    def check(self, address: str, host: str) -> None:
        reason = self.problem(address)
        if reason is not None:
            raise BlockedAddress(f"{host} -> {reason} (not in allow_private_addresses)")


# ---------------------------------------------------------------------------------------------------- deadline

_local = threading.local()


def current_deadline() -> float | None:
    return getattr(_local, "deadline", None)


@contextlib.contextmanager
def deadline_scope(seconds: float, fresh: bool = False) -> Iterator[float]:
    """The deadline of the URL being fetched in this thread; nested scopes share the outer one
    (a redirect belongs to the same URL) unless ``fresh`` (robots.txt gets its own budget)."""
    outer = current_deadline()
    deadline = time.monotonic() + seconds if (outer is None or fresh) else outer
    _local.deadline = deadline
    try:
        yield deadline
    finally:
        _local.deadline = outer


def extend_deadline(seconds: float) -> None:
    """Give the current URL back time it spent waiting on something that is not its own response
    (its host's robots.txt, fetched once and shared by every thread)."""
    if current_deadline() is not None:
        _local.deadline += seconds


def _remaining(op_timeout: float | None, deadline: float | None) -> float:
    if deadline is None:
        return op_timeout if op_timeout is not None else 60.0
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("no complete response before the deadline")
    return min(left, op_timeout) if op_timeout is not None else left


# ---------------------------------------------------------------------------------------------------- sockets


class _GuardedRaw(io.RawIOBase):
    """The response's raw byte source: every read honours the deadline and counts toward the cap.

    The deadline is the one of the request that opened the connection: img2dataset reads the body
    after ``urlopen`` has returned, outside any scope we control."""

    def __init__(
        self,
        sock: socket.socket,
        op_timeout: float | None,
        deadline: float | None,
        max_bytes: int,
        counter: ByteCounter,
    ):
        super().__init__()
        self._deadline = deadline
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # a SocketIO: keeps the socket open while reading
        self._op_timeout = op_timeout
        self._max_bytes = max_bytes
        self._counter = counter
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        self._sock.settimeout(_remaining(self._op_timeout, self._deadline))
        try:
            n = self._raw.readinto(buffer)
        except TimeoutError:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise DeadlineExceeded("no complete response before the deadline") from None
            raise
        n = n or 0
        self._read += n
        self._counter.add(n)
        if self._read > self._max_bytes:
            raise ResponseTooLarge(f"response is larger than max_response_bytes={self._max_bytes}")
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _GuardedSocket:
    """What HTTPResponse is handed instead of the socket: it only ever calls ``makefile('rb')``."""

    def __init__(
        self,
        sock: socket.socket,
        op_timeout: float | None,
        deadline: float | None,
        max_bytes: int,
        counter: ByteCounter,
    ):
        self._args = (sock, op_timeout, deadline, max_bytes, counter)

    def makefile(self, mode: str, *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_GuardedRaw(*self._args))

    def close(self) -> None:  # the fd stays open until the response's reader is closed too
        self._args[0].close()


@dataclass
class ByteCounter:
    """Bytes received and connections made, summed over the threads of one shard."""

    received: int = 0
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self._lock:
            self.received += n

    def connected(self) -> None:
        with self._lock:
            self.connections += 1


@dataclass(frozen=True)
class Limits:
    policy: AddressPolicy
    max_bytes: int
    counter: ByteCounter


def _make_connector(limits: Limits):
    """socket.create_connection with the address policy applied to every resolved address."""

    def create_connection(address, timeout=None, source_address=None, **_):
        host, port = address
        timeout = None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout  # type: ignore[attr-defined]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise OSError(f"curate:dns_error: cannot resolve {host}: {e}") from None
        blocked, last_error = None, None
        for family, kind, proto, _, sockaddr in infos:
            reason = limits.policy.problem(sockaddr[0])
            if reason is not None:
                blocked = blocked or BlockedAddress(f"{host} -> {reason} (not in allow_private_addresses)")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_remaining(timeout, current_deadline()))
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                limits.policy.check(sock.getpeername()[0], host)
                limits.counter.connected()
                return sock
            except OSError as e:
                sock.close()
                if isinstance(e, GuardError):
                    raise
                last_error = e
        if last_error is not None:
            raise last_error
        raise blocked or OSError(f"curate:dns_error: no address for {host}")

    return create_connection


class _GuardedConnection:
    """Mixed into HTTPConnection / HTTPSConnection: our connector, and responses read through the guard."""

    def __init__(self, host: str, *args, limits: Limits, **kwargs):
        super().__init__(host, *args, **kwargs)  # type: ignore[call-arg]
        self._create_connection = _make_connector(limits)
        self._limits = limits
        self._deadline = current_deadline()  # the URL's: the body is read after urlopen returned

    def getresponse(self):
        real = self.sock  # type: ignore[has-type]
        limits = self._limits
        op_timeout = None if self.timeout is socket._GLOBAL_DEFAULT_TIMEOUT else self.timeout  # type: ignore
        self.sock = _GuardedSocket(real, op_timeout, self._deadline, limits.max_bytes, limits.counter)
        try:
            return super().getresponse()  # type: ignore[misc]
        finally:
            if self.sock is not None:
                self.sock = real


class _SafeHTTPConnection(_GuardedConnection, http.client.HTTPConnection):
    pass


class _SafeHTTPSConnection(_GuardedConnection, http.client.HTTPSConnection):
    pass


class SafeHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, limits: Limits):
        super().__init__()
        self.limits = limits

    def http_open(self, req):
        return self.do_open(_SafeHTTPConnection, req, limits=self.limits)


class SafeHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, limits: Limits):
        super().__init__()
        self.limits = limits

    def https_open(self, req):
        return self.do_open(_SafeHTTPSConnection, req, limits=self.limits)


class LimitedRedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = 5


class SafeOpener(urllib.request.OpenerDirector):
    """Starts the per-URL deadline on the outermost ``open`` of a thread; redirects share it."""

    def __init__(self, deadline_seconds: float):
        super().__init__()
        self.deadline_seconds = deadline_seconds

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):  # type: ignore[attr-defined]
        with deadline_scope(self.deadline_seconds):
            return super().open(fullurl, data, timeout)


def build_opener(
    policy: AddressPolicy,
    deadline_seconds: float,
    max_bytes: int,
    counter: ByteCounter | None = None,
    extra_handlers: Iterable[urllib.request.BaseHandler] = (),
) -> SafeOpener:
    """An opener with only the handlers listed here (no file, ftp, data or proxy handlers)."""
    limits = Limits(policy, max_bytes, counter or ByteCounter())
    opener = SafeOpener(deadline_seconds)
    for handler in (
        urllib.request.UnknownHandler(),
        SafeHTTPHandler(limits),
        SafeHTTPSHandler(limits),
        urllib.request.HTTPDefaultErrorHandler(),
        LimitedRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        *extra_handlers,
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def installed(opener: urllib.request.OpenerDirector) -> Iterator[None]:
    """Make ``urllib.request.urlopen`` use ``opener`` (what img2dataset calls), then put back the old one."""
    previous = urllib.request._opener  # type: ignore[attr-defined]
    urllib.request.install_opener(opener)
    try:
        yield
    finally:
        urllib.request.install_opener(previous)  # type: ignore[arg-type]
