"""Progress lines for long work: rows done / total, rate and time left, per stage.

Plain lines (not a redrawn bar) so they read the same in a terminal, a log file and `ray job logs`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    stage: str
    shards_total: int
    rows_total: int
    shards_done: int = 0
    rows_done: int = 0
    failed: int = 0
    interval: float = 2.0
    write: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    _started: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    _rows_at_start: int = 0
    _shards_at_start: int = 0

    def start(self) -> None:
        self._rows_at_start = self.rows_done
        self._shards_at_start = self.shards_done
        self._started = time.monotonic()
        self.write(self.line())

    def update(self, rows: int, ok: bool = True) -> None:
        if ok:
            self.shards_done += 1
            self.rows_done += rows
        else:
            self.failed += 1
        now = time.monotonic()
        finished = self.shards_done + self.failed >= self.shards_total
        if finished or now - self._last >= self.interval:
            self._last = now
            self.write(self.line())

    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return (self.rows_done - self._rows_at_start) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        failed = f"  {self.failed} failed" if self.failed else ""
        if self.rows_total == 0 and self.shards_total > 0:  # rows not known before reading (tars): shards tell
            elapsed = time.monotonic() - self._started
            left = self.shards_total - self.shards_done - self.failed
            done_here = self.shards_done + self.failed - self._shards_at_start
            eta = _duration(left * elapsed / done_here) if done_here > 0 and left > 0 else "-"
            return (
                f"[{self.stage}] shards {self.shards_done}/{self.shards_total}  "
                f"rows {self.rows_done:,}  {rate:,.1f} rows/s  eta {eta}{failed}"
            )
        left = self.rows_total - self.rows_done
        eta = _duration(left / rate) if rate > 0 and left > 0 else "-"
        return (
            f"[{self.stage}] shards {self.shards_done}/{self.shards_total}  "
            f"rows {self.rows_done:,}/{self.rows_total:,}  {rate:,.1f} rows/s  eta {eta}{failed}"
        )
