"""The picker behind Envoy's ext_authz hop (``bench/authz_picker.py``, a ``--floor`` path of
``bench/gateway.py``) answers each check with the picker's own decision: the fallback list as the header
Envoy routes on, a refusal as its status and JSON error."""

from __future__ import annotations

import msgspec

from bench.authz_picker import check, headers_of
from ops.envoy import DESTINATION
from tests.unit.services.test_gateway_picker import chat, picker, report


def _head(path: str = "/v1/chat/completions", **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: gantry-picker", *(f"{k}: {v}" for k, v in headers.items())]
    return "\r\n".join(lines).encode()


def test_headers_are_read_as_the_picker_reads_them() -> None:
    got = headers_of(_head(**{"X-Gantry-Priority": " -1"}))
    assert got[":method"] == "POST" and got[":path"] == "/v1/chat/completions"
    assert got["x-gantry-priority"] == "-1"


async def test_a_decision_is_a_200_naming_the_pickers_list_and_the_request_is_not_left_in_flight() -> None:
    p, router = picker(report("a", 8001), report("b", 8002))
    out = await check(p, _head(), chat())
    assert out.startswith(b"HTTP/1.1 200")
    dest = next(line for line in out.split(b"\r\n") if line.startswith(DESTINATION.encode()))
    listed = dest.split(b": ", 1)[1].decode().split(",")
    assert set(listed) == {"127.0.0.1:8001", "127.0.0.1:8002"}
    assert p.counters.picks == 1
    assert [s.inflight_requests for s in router.state.endpoints.values()] == [0, 0]


async def test_no_endpoint_for_the_model_is_a_503_with_an_openai_style_error() -> None:
    p, _ = picker(report("a", 8001, model="other"))
    out = await check(p, _head(), chat())
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503")
    assert msgspec.json.decode(body)["error"]["code"] == 503


async def test_envoys_health_check_is_answered_without_a_decision() -> None:
    p, _ = picker(report("a", 8001))
    assert (await check(p, b"GET /health HTTP/1.1\r\nhost: x", b"")).startswith(b"HTTP/1.1 200")
    assert p.counters.picks == 0
