"""Stopping a run from outside: SIGINT (Ctrl-C, `kill -INT`) and SIGTERM (how a scheduler or `ray job stop` ends
a job) raise `Interrupted` in the driver's main thread, so every `finally` runs (temporaries removed, servers
stopped, the run log written) and the command ends with one line instead of a traceback.

Why handlers of our own, installed again once Ray is connected:
- a process started in the background of a non-interactive shell (`cmd &` in a script, and so every job runner
  that does this) inherits SIGINT *ignored*, and Python then leaves it ignored: `kill -INT` of the driver did
  nothing and the run went on;
- `ray.init` replaces the SIGTERM handler with `sys.exit` and its core worker adds a C++ handler that prints a
  stack dump ("*** SIGTERM received ... PC: @ ...") first; setting ours after `ray.init` replaces both.
Ray's own processes block SIGINT (services.py), so Ctrl-C in a terminal reaches only the driver.

The stall watchdog (curate.watchdog) stops the run the same way from its thread (`stop_main_thread`): a signal
sent to the main thread wakes it even while it waits inside Ray Data or `ray.wait`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped: by a signal (`signum`), or by the watchdog (`reason`, no signal).

    A BaseException, like KeyboardInterrupt, so that `except Exception` on the way up (a stage's error
    handling) does not turn it into a stage failure."""

    def __init__(self, signum: int | None = None, reason: str = ""):
        self.signum = signum
        self.reason = reason
        self.where = ""  # what was interrupted (a stage and its progress), filled in on the way up
        super().__init__(reason or self.signal_name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it; 1 for the watchdog."""
        return 128 + self.signum if self.signum else 1


_pending_reason: list[str] = []  # set by stop_main_thread just before it signals the main thread
_installed = threading.Event()


def _raise(signum: int, frame) -> None:
    if _pending_reason:
        raise Interrupted(None, _pending_reason.pop())
    raise Interrupted(signum)


def _install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _raise)
    _installed.set()


def reinstall() -> None:
    """Inside an `interruptible` block: install the handlers again (after `ray.init`, which replaces SIGTERM's)."""
    if _installed.is_set() and threading.current_thread() is threading.main_thread():
        _install()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside the block; the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _install()
    try:
        yield
    finally:
        _installed.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def stop_main_thread(reason: str) -> bool:
    """From another thread: make the main thread raise `Interrupted(reason=...)` now. False (nothing done) when
    no `interruptible` block is active, since the signal would then be the default SIGINT's."""
    if not _installed.is_set():
        return False
    _pending_reason.append(reason)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
    return True
