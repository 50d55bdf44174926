"""How many requests to keep in flight on one server: an adaptive window.

The window starts at the configured maximum, because an inference engine queues what it cannot run yet (vLLM,
SGLang) and a full queue is what keeps its batch full. A server that pushes back (429 or 503) or stops answering
in time (a timeout) halves it; each answer then grows it again. Growth is fast back toward the size at which the
push-back began (half the remaining gap per window of answers, as TCP BIC does after a loss) and slow beyond it
(one request per window of answers, TCP's additive increase), and only while the server's latency holds: with an
answer latency (moving average) over twice its lowest since the push-back, the window stays where it is, since
the server is queueing what more would add.

Only signals from requests sent at the current size count (`epoch`), so the answers of one burst halve the window
once, not once per request. A run of push-backs with no success in between (a 429 storm) halves it each time but
keeps the size it began at as the target to grow back to.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_SLACK = 2.0
EWMA = 0.2  # weight of the newest latency in the moving average


@dataclass
class Window:
    maximum: int
    minimum: int = 1
    size: float = 0.0
    epoch: int = 0  # bumped at every decrease
    target: float = 0.0  # the size at which the current push-back began
    congested: bool = False  # push-back seen and no success at the reduced size yet
    latency: float | None = None  # moving average, seconds
    floor: float | None = None  # lowest moving average since the last decrease
    lowest: float = 0.0  # the smallest limit this window has had

    def __post_init__(self) -> None:
        self.minimum = min(self.minimum, self.maximum)
        self.size = self.size or float(self.maximum)
        self.target = self.target or self.size
        self.lowest = self.size

    @property
    def limit(self) -> int:
        return max(self.minimum, min(self.maximum, int(self.size)))

    def on_answer(self, sent_epoch: int, seconds: float) -> None:
        """A request sent at ``sent_epoch`` was answered (200) after ``seconds``."""
        self.latency = seconds if self.latency is None else (1 - EWMA) * self.latency + EWMA * seconds
        self.floor = self.latency if self.floor is None else min(self.floor, self.latency)
        if sent_epoch == self.epoch:
            self.congested = False
        if self.congested or self.size >= self.maximum or self.latency > LATENCY_SLACK * self.floor:
            return
        gap = self.target - self.size
        step = gap / (2 * self.size) if gap > 1 else 1 / self.size
        self.size = min(float(self.maximum), self.size + max(step, 1 / self.size))

    def on_push_back(self, sent_epoch: int) -> bool:
        """A 429/503 or a timeout for a request sent at ``sent_epoch``; True when the window was halved."""
        if sent_epoch != self.epoch:
            return False
        if not self.congested:
            self.target = self.size
            self.congested = True
        self.size = max(float(self.minimum), self.size / 2)
        self.epoch += 1
        self.floor = None
        self.lowest = min(self.lowest, self.limit)
        return True
