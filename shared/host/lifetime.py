"""Children that do not outlive their parent.

``gantry up``'s launcher (``ops.stack``) and the emulated fleet's engine servers (``services.workers``) start
children that must die with whoever started them, even when that parent is SIGKILLed and can clean up nothing.
``dying_with_parent(argv, env)`` runs the command through an exec wrapper that sets the signal
(``pdeathsig_exec.py``). No pre-exec hook: a ``preexec_fn`` makes ``subprocess`` fork() a threaded parent (unsafe)
and run every fork handler loaded there in the child; without one it spawns with vfork and runs none.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_EXEC_WRAPPER = Path(__file__).with_name("pdeathsig_exec.py")


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


# Whether the wrapper can set the signal here (Linux's prctl); looked up once.
_LIBC = _load_libc()


def dying_with_parent(argv: Sequence[str], env: Mapping[str, str], parent_pid: int | None = None) -> list[str]:
    """``argv`` run through the exec wrapper: SIGTERM when this process dies, exit 1 before starting if it is
    already gone (Linux; elsewhere ``argv`` as is). ``env`` is the environment the command is started with;
    ``parent_pid`` the parent the child must still have when it starts (default: this process).

    The command keeps the wrapper's pid (it execs in its place). A command that cannot be run is reported on the
    child's stderr with exit code 127, as a shell does, not raised here."""
    if _LIBC is None:
        return list(argv)
    lc_ctype = env.get("LC_CTYPE")
    return [sys.executable, "-I", "-S", str(_EXEC_WRAPPER), str(parent_pid or os.getpid()),
            "-" if lc_ctype is None else f"={lc_ctype}", "--", *argv]
