"""Children that do not outlive their parent: the pre-exec hook both process launchers use.

``gantry up``'s launcher (``ops.stack``) and the emulated fleet's engine servers (``services.workers``) start
children that must die with whoever started them, even when that parent is SIGKILLed and can clean up nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


# Loaded once, in the parent: the hook then makes a single foreign call in the forked child (nothing that locks).
_LIBC = _load_libc()


def die_with_parent(parent_pid: int | None = None) -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies (Linux; elsewhere nothing happens).

    With ``parent_pid``, a parent that died between the fork and this call (so no signal will ever come) makes
    the child exit at once instead of starting as an orphan.
    """
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
