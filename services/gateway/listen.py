"""Where the picker listens: unix sockets in a private directory (the default, wherever Envoy shares its host),
or TCP ports (an explicit choice, for Envoy in another container).

A unix socket is reached through the file system, so who may connect is who may enter its directory (mode
0700, owned by the picker's user) and open the socket (mode 0600): Envoy, run by the same user, and nobody
else. A TCP port on 127.0.0.1 is open to every local user, and wider to the network (docs/security.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import stat
from pathlib import Path

DIR_MODE = 0o700
SOCKET_MODE = 0o600
MAX_PATH_BYTES = 107  # sun_path holds 108 bytes with its terminating NUL (Linux)
SPARE_FDS = 256  # what the picker holds besides its listeners' connections (NATS, engines' files, logs, gRPC)

log = logging.getLogger("gantry.gateway")


class ListenError(RuntimeError):
    """The picker cannot listen where it was told (a directory others can enter, a path in use or too long)."""


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (created if missing, its mode narrowed if wider);
    raises ListenError when another user owns it."""
    path = path.resolve()
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ListenError(f"{path} belongs to uid {st.st_uid}, not to this user: others could replace the socket")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def free_socket_path(path: Path) -> Path:
    """``path`` ready to bind: a socket left by a picker that is gone is removed; raises ListenError when the
    path is too long for a unix socket, is not a socket, or a live server answers there (another replica)."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ListenError(f"unix socket path longer than {MAX_PATH_BYTES} bytes: {path}")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:  # refused: nobody listens any more
        path.unlink(missing_ok=True)
        return path
    finally:
        probe.close()
    raise ListenError(f"another server listens on {path}")


def restrict(path: Path) -> None:
    """Narrow a bound socket's mode to its owner (the directory already keeps others out meanwhile)."""
    os.chmod(path, SOCKET_MODE)


def remove(path: Path) -> None:
    """Remove a socket this picker bound (on stop), if still there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def fd_room(connections: int) -> int:
    """Make room for ``connections`` open at once plus ``SPARE_FDS``: the soft limit on open files is raised
    toward the hard one when lower (a connection cap above it would bound nothing: accepts would fail first).
    Returns the soft limit now; logs a warning when even the hard limit is short."""
    need = connections + SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("open files limited to %d, below the %d the connection caps need: lower --max-connections",
                    soft, need)
    return soft
