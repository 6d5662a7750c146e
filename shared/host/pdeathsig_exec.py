"""Exec wrapper that gives a command the parent-death signal without a pre-exec hook in the parent.

``python -I -S pdeathsig_exec.py PARENT_PID LC_CTYPE -- COMMAND [ARG...]`` asks Linux for SIGTERM when its parent
dies (``PR_SET_PDEATHSIG``, kept across exec), exits 1 at once if ``PARENT_PID`` is no longer its parent (the
parent died before the request: no signal would ever come), then execs COMMAND in its own place (same pid).

Why: a Python ``preexec_fn`` forces ``subprocess`` to fork() and run every fork handler of the parent in the child
(gRPC's aborted a child once); started through this file, the parent spawns with vfork/posix_spawn and no handler
runs. Only the standard library is used (run by path with ``-I -S``: no site, no project import). What this
interpreter changes that exec would carry over is undone first: the signals it ignores, and ``LC_CTYPE`` when it
coerced a C locale (PEP 538); ``LC_CTYPE`` is the launcher's value (``=VALUE``) or ``-`` when unset.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_IGNORED_BY_PYTHON = ("SIGPIPE", "SIGXFZ", "SIGXFSZ")  # subprocess restores these in its children: so do we


def main(argv: list[str]) -> int:
    """Set the parent-death signal, check the parent, restore what exec would carry over, exec the command."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: pdeathsig_exec.py PARENT_PID (=LC_CTYPE | -) -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    parent, lc_ctype, command = int(argv[0]), argv[1], argv[3:]
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        print(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    if os.getppid() != parent:
        return 1
    for name in _IGNORED_BY_PYTHON:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    if lc_ctype == "-":
        os.environ.pop("LC_CTYPE", None)
    else:
        os.environ["LC_CTYPE"] = lc_ctype.removeprefix("=")
    try:
        os.execvp(command[0], command)
    except OSError as err:
        print(f"cannot run {command[0]}: {err.strerror or err}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
