"""The engine server's access log line is uvicorn's, byte for byte, only cheaper to build."""

from __future__ import annotations

import logging
import sys

import pytest
from uvicorn.logging import AccessFormatter

from services.engine_server.access_log import UVICORN_ACCESS_FMT, AccessLineFormatter, log_config


def _record(args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", level, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "level"), [
    (("127.0.0.1:5000", "POST", "/v1/completions", "1.1", 200), logging.INFO),
    (("127.0.0.1:5000", "GET", "/v1/models?x=1", "1.0", 404), logging.INFO),
    (("[::1]:1", "POST", "/v1/chat/completions", "1.1", 422), logging.WARNING),
    (("127.0.0.1:5000", "GET", "/health", "1.1", 599), logging.INFO),  # no phrase: "599 "
])
def test_access_line_is_uvicorns_line(args: tuple[object, ...], level: int) -> None:
    ours = AccessLineFormatter(fmt=UVICORN_ACCESS_FMT, use_colors=False)
    theirs = AccessFormatter(fmt=UVICORN_ACCESS_FMT, use_colors=False)
    assert ours.format(_record(args, level)) == theirs.format(_record(args, level))


@pytest.mark.parametrize("kwargs", [{"fmt": UVICORN_ACCESS_FMT, "use_colors": True},
                                    {"fmt": "%(client_addr)s %(status_code)s", "use_colors": False}])
def test_colours_or_another_format_are_uvicorns_own(kwargs: dict[str, object]) -> None:
    rec = ("127.0.0.1:5000", "POST", "/v1/completions", "1.1", 200)
    assert AccessLineFormatter(**kwargs).format(_record(rec)) == AccessFormatter(**kwargs).format(_record(rec))  # type: ignore[arg-type]


def test_a_record_with_an_exception_is_uvicorns_own() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc = sys.exc_info()
    rec = ("127.0.0.1:5000", "POST", "/v1/completions", "1.1", 500)
    a, b = _record(rec), _record(rec)
    a.exc_info = b.exc_info = exc
    line = AccessLineFormatter(fmt=UVICORN_ACCESS_FMT, use_colors=False).format(a)
    assert line == AccessFormatter(fmt=UVICORN_ACCESS_FMT, use_colors=False).format(b)
    assert "RuntimeError: boom" in line


def test_log_config_swaps_only_the_access_formatter() -> None:
    cfg = log_config()
    assert cfg["formatters"]["access"]["()"] == "services.engine_server.access_log.AccessLineFormatter"
    assert cfg["formatters"]["access"]["fmt"] == UVICORN_ACCESS_FMT
    assert cfg["formatters"]["default"]["()"] == "uvicorn.logging.DefaultFormatter"
