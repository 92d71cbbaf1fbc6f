"""Child-process hygiene for the embedded runtime."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when its parent dies (Linux).

    A ``fedkube run`` killed with SIGKILL then leaves no orphaned services or
    redis-server behind, and ``--resume`` can start them afresh.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not glibc/Linux: children may then outlive a SIGKILLed runner
