"""The report of a run in progress: rebuilt after each stage in one background thread while the next stage
runs, and once more, in the foreground, when the run ends (finished, failed or interrupted).

A build runs beside the stages rather than between them so a run never waits for its report (a build reads
records and a bounded sample: about a second on the demo, the same at any size). At most one build runs and
at most one waits: a stage that finishes while a build is still waiting adds nothing. A build that fails is
one log line (`build_quietly`), never a failed run.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from curate.report.build import build_quietly


class RunReport:
    def __init__(self, run_uri: str, log: Callable[[str], None]):
        self.run_uri = run_uri
        self.log = log
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="curate-report")
        self._waiting: Future | None = None

    def stage_done(self) -> None:
        """Rebuild soon (in the background), unless a rebuild is already waiting to start."""
        if self._waiting is not None and not self._waiting.running() and not self._waiting.done():
            return
        self._waiting = self._pool.submit(build_quietly, self.run_uri, self.log)

    def close(self) -> str | None:
        """Drop a build that has not started, wait for the one running, then build the final report."""
        if self._waiting is not None:
            self._waiting.cancel()
        self._pool.shutdown(wait=True)
        return build_quietly(self.run_uri, self.log)


__all__ = ["RunReport"]
