"""robots.txt, which img2dataset does not consult: a urllib pre-processor that checks every request
(the first and each redirect) against its host's robots.txt, parsed by Protego (Scrapy's parser),
fetched once per host and worker process and cached.

What a fetch outcome means follows RFC 9309: 2xx -> the rules; 4xx -> no rules (allowed);
5xx -> everything disallowed; too many redirects -> no rules. When robots.txt cannot be fetched at all
(connection refused, timeout, DNS) the URL is not fetched either and gets the network error as its
reason. The robots.txt request itself goes through the same safe opener (address checks, size cap)
with its own deadline.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from curate.download.net import GuardError, RobotsDisallowed, deadline_scope, extend_deadline

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB
RULES_TTL = 24 * 3600.0  # RFC 9309: do not use a cached robots.txt for more than 24 hours
ERROR_TTL = 3600.0
CACHE_SIZE = 100_000


@dataclass(frozen=True)
class RobotsOutcome:
    parser: Any = None  # protego.Protego, or None for "no rules"
    disallow_all: bool = False
    error: str | None = None  # robots.txt could not be fetched: the URL fails with this
    expires: float = 0.0

    def verdict(self, url: str, user_agent: str) -> str | None:
        """None if the URL may be fetched, else the reason it may not."""
        if self.error is not None:
            return self.error
        if self.disallow_all:
            return "disallowed"
        if self.parser is not None and not self.parser.can_fetch(url, user_agent):
            return "disallowed"
        return None


class RobotsCache:
    """Per-process, per-host cache with one fetch in flight per host (the other threads wait for it)."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._entries: dict[tuple[Any, ...], RobotsOutcome] = {}
        self._locks: dict[tuple[Any, ...], threading.Lock] = {}
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, key: tuple[Any, ...], fetch) -> RobotsOutcome:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry.expires > now:
            return entry
        with self._lock:
            host_lock = self._locks.setdefault(key, threading.Lock())
        with host_lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires > time.monotonic():
                return entry
            entry = fetch()
            with self._lock:
                self.fetches += 1
                self._entries[key] = entry
                while len(self._entries) > self.size:
                    self._entries.pop(next(iter(self._entries)))
                    self._locks.pop(next(iter(self._locks)), None)
            return entry


CACHE = RobotsCache()
_local = threading.local()


def _fetch(opener: urllib.request.OpenerDirector, robots_url: str, timeout: float, user_agent: str) -> RobotsOutcome:
    from protego import Protego

    now = time.monotonic()
    request = urllib.request.Request(robots_url, headers={"User-Agent": user_agent})
    _local.fetching = True
    try:
        with deadline_scope(timeout, fresh=True), opener.open(request, timeout=timeout) as response:
            body = response.read(ROBOTS_MAX_BYTES)
        return RobotsOutcome(Protego.parse(body.decode("utf-8", errors="replace")), expires=now + RULES_TTL)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            return RobotsOutcome(disallow_all=True, expires=now + ERROR_TTL)
        return RobotsOutcome(expires=now + RULES_TTL)  # 4xx, or a redirect loop: no rules
    except GuardError as e:
        return RobotsOutcome(error=str(e), expires=now + ERROR_TTL)
    except urllib.error.URLError as e:  # a guard error while connecting arrives wrapped by urllib
        message = str(e.reason) if isinstance(e.reason, GuardError) else f"robots.txt could not be fetched: {e}"
        return RobotsOutcome(error=message, expires=now + ERROR_TTL)
    except Exception as e:
        return RobotsOutcome(error=f"robots.txt could not be fetched: {e}", expires=now + ERROR_TTL)
    finally:
        _local.fetching = False


class RobotsHandler(urllib.request.BaseHandler):
    """Pre-processor for http and https requests; raises RobotsDisallowed (or the fetch's error)."""

    handler_order = 400  # before the connection handlers (500)

    def __init__(
        self, user_agent_token: str, user_agent: str, timeout: float, cache_key: Any = None, cache: RobotsCache = CACHE
    ):
        self.token = user_agent_token
        self.user_agent = user_agent
        self.timeout = timeout
        self.cache_key = cache_key  # e.g. the address policy: a robots.txt blocked under one is not under another
        self.cache = cache

    def _check(self, request: urllib.request.Request) -> urllib.request.Request:
        if getattr(_local, "fetching", False):
            return request
        url = request.full_url
        parts = urllib.parse.urlsplit(url)
        robots_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/robots.txt", "", ""))
        key = (parts.scheme, parts.netloc.lower(), self.cache_key)
        waited = time.monotonic()
        outcome = self.cache.get(key, lambda: _fetch(self.parent, robots_url, self.timeout, self.user_agent))
        extend_deadline(time.monotonic() - waited)  # robots.txt has its own budget, not the URL's
        verdict = outcome.verdict(url, self.token)
        if verdict == "disallowed":
            raise RobotsDisallowed(f"{robots_url} disallows {parts.path or '/'} for {self.token}")
        if verdict is not None:
            raise OSError(verdict if verdict.startswith("curate:") else f"robots.txt: {verdict}")
        return request

    http_request = _check
    https_request = _check
