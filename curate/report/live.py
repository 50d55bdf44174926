"""The report of a run in progress: rebuilt in one background thread after stages finish, while the next stage
runs, and once more, in the foreground, when the run ends (finished, failed or interrupted).

A build runs beside the stages rather than between them so a run never waits for its report. Builds start at
most every MIN_INTERVAL seconds: a stage that finishes sooner after the last build start is shown by the next
build, which starts when the interval is over (the page is for people; a pipeline of quick stages, such as a
test's, then builds once or twice, not once per stage). A build that fails is one log line (`build_quietly`),
never a failed run. `CURATE_REPORT=0` in the environment turns the runner's builds off (`curate report` still
builds on demand): the test suite sets it for the many small pipelines it runs, whose reports nobody reads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from curate.report.build import build_quietly

MIN_INTERVAL = 30.0


def enabled() -> bool:
    return os.environ.get("CURATE_REPORT", "1").strip().lower() not in ("0", "false", "no", "off")


class RunReport:
    def __init__(self, run_uri: str, log: Callable[[str], None], min_interval: float = MIN_INTERVAL):
        self.enabled = enabled()
        self.run_uri = run_uri
        self.log = log
        self.min_interval = min_interval
        self._wake = threading.Condition()
        self._dirty = False
        self._closed = False
        self._last_start = -float("inf")
        self._thread = threading.Thread(target=self._loop, name="curate-report", daemon=True)
        if self.enabled:
            self._thread.start()

    def stage_done(self) -> None:
        """Ask for a rebuild (in the background, once the interval since the last one is over)."""
        with self._wake:
            self._dirty = True
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._dirty or time.monotonic() < self._last_start + self.min_interval):
                    wait = None if not self._dirty else self._last_start + self.min_interval - time.monotonic()
                    self._wake.wait(wait)
                if self._closed:
                    return
                self._dirty = False
                self._last_start = time.monotonic()
            build_quietly(self.run_uri, self.log)

    def close(self) -> str | None:
        """Stop the background builds (waiting for one that is running), then build the final report."""
        if not self.enabled:
            return None
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        return build_quietly(self.run_uri, self.log)


__all__ = ["MIN_INTERVAL", "RunReport"]
