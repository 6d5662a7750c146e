"""Where the picker listens: unix sockets by default, in a directory only its user may enter; TCP only when a
port is asked for; a socket path refused when too long, not a socket, or held by a live server."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.gateway.__main__ import parse_args
from services.gateway.listen import MAX_PATH_BYTES, ListenError, free_socket_path, private_dir
from services.gateway.protocol import DEFAULT_SOCKET_DIR, GRPC_SOCKET

BASE = ["--nats-url", "nats://x:1", "--eds-path", "e.json"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit in a unix socket's (pytest's own can be too long)."""
    with tempfile.TemporaryDirectory(prefix="gl-") as d:
        yield Path(d)


def test_the_picker_listens_on_unix_sockets_unless_a_port_is_given() -> None:
    opts = parse_args(BASE)
    assert not opts.tcp and opts.grpc_address() == f"unix:{Path(DEFAULT_SOCKET_DIR).resolve() / GRPC_SOCKET}"
    assert parse_args([*BASE, "--socket-dir", "/s"]).grpc_address() == "unix:/s/epp.sock"
    tcp = parse_args([*BASE, "--grpc-port", "9100"])
    assert tcp.tcp and tcp.grpc_address() == "127.0.0.1:9100" and tcp.http_address() == "127.0.0.1:9003"
    assert parse_args([*BASE, "--http-port", "9200"]).grpc_address() == "127.0.0.1:9002"


def test_a_socket_directory_and_a_port_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--socket-dir", "/s", "--grpc-port", "1"])
    assert "exclude each other" in capsys.readouterr().err


def test_the_socket_directory_is_made_private_even_when_it_existed_open(short_dir: Path) -> None:
    fresh = private_dir(short_dir / "a" / "b")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    opened = short_dir / "open"
    opened.mkdir(mode=0o777)
    os.chmod(opened, 0o777)
    assert stat.S_IMODE(private_dir(opened).stat().st_mode) == 0o700


def test_a_socket_left_by_a_dead_picker_is_replaced_but_a_live_one_is_not(short_dir: Path) -> None:
    path = short_dir / GRPC_SOCKET
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ListenError, match="another server"):
            free_socket_path(path)
    finally:
        live.close()  # the file stays, nobody listens: what a killed picker leaves
    assert path.exists() and free_socket_path(path) == path and not path.exists()


def test_a_path_that_is_not_a_socket_or_too_long_is_refused(short_dir: Path) -> None:
    plain = short_dir / "file"
    plain.write_text("x")
    with pytest.raises(ListenError, match="not a socket"):
        free_socket_path(plain)
    with pytest.raises(ListenError, match="longer than"):
        free_socket_path(short_dir / ("d" * MAX_PATH_BYTES) / GRPC_SOCKET)


def test_the_open_files_limit_is_raised_to_hold_the_connection_caps() -> None:
    import resource

    from services.gateway.listen import SPARE_FDS, fd_room

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048 + SPARE_FDS:
        pytest.skip(f"hard limit on open files {hard}: too low to raise the soft one here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    try:
        assert fd_room(2048) == 2048 + SPARE_FDS == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert fd_room(10) == 2048 + SPARE_FDS  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
