"""How long the processes of a run live: none outlives the one that started it.

- A rank started by a launcher (torchrun, the deepspeed launcher, srun) stops when its launcher
  dies, even by kill -9: Linux sends it SIGTERM (`die_with_parent`).
- SIGTERM (a launcher stopping its ranks, `scancel`, `kill`) and SIGINT (Ctrl-C) end a rank
  through Python's normal exit, so `finally` blocks close the process group and helpers, within a
  bounded time (`exit_cleanly_on_signals`).
- Helper processes that Megatron-Core starts for checkpoint writing die with their rank
  (patches/checkpoint_writer.py uses `exit_with_parent` for them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits; False where not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def exit_with_parent(parent_pid: int) -> None:
    """For a helper process, first thing: be killed with `parent_pid`, which started it (and exit
    now if that already happened)."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)


@contextlib.contextmanager
def exit_cleanly_on_signals(grace_seconds: float = 10.0):
    """While inside: SIGTERM and SIGINT raise SystemExit in the main thread, so that cleanup runs;
    if cleanup has not ended the process `grace_seconds` later (a collective waiting for ranks that
    are gone), it exits then anyway, with the same code. On leaving, the handlers that were there
    before are back (a caller that runs training in-process keeps its own)."""

    def stop(signum, frame):
        deadline = threading.Timer(grace_seconds, os._exit, args=(128 + signum,))
        deadline.daemon = True  # a cleanup that finishes in time is not kept waiting for it
        deadline.start()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
