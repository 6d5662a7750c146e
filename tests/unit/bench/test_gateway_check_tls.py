"""The TLS check bench measures real exchanges: every check answered through the picker's HTTP/1.1 server, over
TLS with Envoy's certificate, the client's TLS share counted apart."""

from __future__ import annotations

from pathlib import Path

import uvloop

from bench.gateway_check_tls import run
from ops.tls import ensure_picker_tls


def test_checks_over_tls_are_answered_and_the_clients_share_is_counted_apart(tmp_path: Path) -> None:
    ensure_picker_tls(tmp_path)
    tls = uvloop.run(run(20, 2, 0.0, 0, tmp_path))
    plain = uvloop.run(run(20, 2, 0.0, 0, None))
    assert tls["client_tls_us_p50"] > 0 and tls["picker_us_p50"] > 0
    assert plain["client_tls_us_p50"] == 0 and plain["picker_us_p50"] == plain["hot_us_p50"] > 0
