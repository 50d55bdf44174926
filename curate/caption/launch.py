"""Run one inference server command so that it never outlives whoever started it.

    python -m curate.caption.launch --parent PID -- vllm serve MODEL --port 8000 ...

The caller starts this in a new session (its own process group). It asks Linux to send it SIGTERM when its
parent dies (`prctl(PR_SET_PDEATHSIG)`), starts the server command in the same process group, and on SIGTERM,
SIGINT or the parent's death terminates the whole group: the engine and every process it forked (vLLM's and
SGLang's per-GPU workers), with SIGKILL after a grace period. When the server exits by itself, whatever it
left in the group is killed and its exit code is returned, so the caller can restart it.

Why not `subprocess` alone: `PR_SET_PDEATHSIG` set for the engine reaches only that one process, not the workers
it forks, and a SIGKILLed caller runs no cleanup. Python's `subprocess` has no parent-death option; supervisors
such as supervisord or systemd own the process tree from outside, which a Ray actor cannot rely on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
GRACE_S = 10.0


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def group_members() -> list[int]:
    """The other live processes of this process group (Linux: /proc/PID/stat, field 5 is the group)."""
    group, me, found = os.getpgid(0), os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[2]) == group:
            found.append(int(entry.name))
    return found


def terminate_group(grace_s: float) -> None:
    """SIGTERM to every other process of this group, SIGKILL to any left after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches this process too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(0), signal.SIGTERM)
    while group_members() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in group_members():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="the pid that started this; exit if it is gone")
    parser.add_argument("--grace-s", type=float, default=GRACE_S)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command after --")
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != args.parent:  # the parent died before the death signal was armed
        return 1
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # same process group as this launcher; the server itself also dies with the launcher, even a SIGKILLed one
    child = subprocess.Popen(command, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    print(f"curate.caption.launch: server pid {child.pid}: {' '.join(command)}", flush=True)
    while child.poll() is None and not stopping:
        time.sleep(0.1)
    if stopping:
        print(f"curate.caption.launch: signal {stopping[0]}: stopping the server's process group", flush=True)
    terminate_group(args.grace_s if stopping else 1.0)  # the server, or what it left behind when it exited
    code = child.wait()
    print(f"curate.caption.launch: server exited with {code}", flush=True)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
