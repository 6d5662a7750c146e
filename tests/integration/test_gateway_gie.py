"""The picker behind an Envoy configured as GIE's own gateways configure it: both bodies streamed full duplex
(``protocol.GIE_PROCESSING_MODE``). A drop-in endpoint picker must route there as on Gantry's own exchange: the
same behaviours as tests/integration/test_gateway.py (whose fixtures these reuse), checked where the request landed
(the engine's own counters and answer), plus what only this mode brings: a body in many chunks handed back whole,
every response chunk handed back, and a gateway whose ext_proc filter cannot route refused with a reason."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.envoy import SERVED
from ops.servers import ServerProcess
from services.gateway.protocol import GIE_PROCESSING_MODE
from tests.integration.test_gateway import (
    MODEL,
    Engine,
    Gateway,
    OnSharedEngines,
    _chat,
    _gateway,
    _wait_routable,
    bodies_past_envoys_default_buffer,
    gateway_marks,
    malformed_then_fine,
    no_endpoint_answer,
    shed_and_kept_on_a_busy_engine,
    streams_land_where_picked,
)

pytestmark = gateway_marks(180)


@pytest.fixture
def gateway(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(nats_server.url, tmp_path, 1, ext_proc_mode=GIE_PROCESSING_MODE)


def test_a_body_of_megabytes_reaches_the_engine_and_one_past_the_limit_is_refused_413_by_envoy(
        gateway: Gateway, nats_server: ServerProcess, tmp_path: Path) -> None:
    within, past = bodies_past_envoys_default_buffer(gateway, nats_server.url, tmp_path)
    assert within.status_code == 400 and "maximum context of 100000" in within.json()["error"]["message"]
    assert within.headers[SERVED]
    assert past.status_code == 413 and SERVED not in past.headers


def test_sheddable_request_is_429_when_the_pool_is_saturated(gateway: Gateway, nats_server: ServerProcess,
                                                             tmp_path: Path) -> None:
    shed, kept = shed_and_kept_on_a_busy_engine(gateway, nats_server.url, tmp_path)
    assert shed == 429 and kept == 200


@pytest.fixture
def streamed_body_gateway(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    """An Envoy whose ext_proc filter streams the request body without waiting (``STREAMED``): its router picks a
    host as soon as the picker has answered the headers, before any body could be read."""
    mode = {**GIE_PROCESSING_MODE, "request_body_mode": "STREAMED", "request_trailer_mode": "SKIP"}
    yield from _gateway(nats_server.url, tmp_path, 1, ext_proc_mode=mode)


@pytest.fixture
def subset_gateway(nats_server: ServerProcess, tmp_path: Path, engines: list[Engine]) -> Iterator[Gateway]:
    """An Envoy that sets GIE's subset hint on every request: the second engine only."""
    yield from _gateway(nats_server.url, tmp_path, 1, ext_proc_mode=GIE_PROCESSING_MODE,
                        subset_hint=(engines[1].address,))


class TestOnEnginesLeftAsFound(OnSharedEngines):
    """Behaviours that leave the engines (and the gateway) as they found them share them: two engines and one
    gateway for the class, each started once (an engine's start is most of a test's ~2 s setup). Every check here
    is relative to the engines' counters before it, so the order of the tests does not matter. Tests that add
    engines of their own (a busy one, one of a 100k-token context) keep a fresh gateway; the gateways that route
    differently (a subset, a body streamed without waiting) are their own, and come first."""

    @pytest.fixture(scope="class")
    @classmethod
    def gateway(cls, nats_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
        yield from _gateway(nats_server.url, tmp_path_factory.mktemp("gateway"), 1,
                            ext_proc_mode=GIE_PROCESSING_MODE)

    def test_a_gateway_that_cannot_route_on_the_body_refuses_with_the_reason_and_models_still_answer(
            self, streamed_body_gateway: Gateway, engines: list[Engine]) -> None:
        deadline = time.monotonic() + 60  # until the picker answers (Envoy's own refusal before it: not JSON)
        listed = [{"id": MODEL, "object": "model", "owned_by": "gantry"}]
        while (r := httpx.get(f"{streamed_body_gateway.url}/v1/models", timeout=10)).headers.get(
                "content-type") != "application/json" or r.json().get("data") != listed:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        before = {e.instance: e.requests_served() for e in engines}
        refused = httpx.post(f"{streamed_body_gateway.url}/v1/chat/completions", json=_chat("hi", 2, False), timeout=10)
        assert refused.status_code == 500
        assert "STREAMED" in refused.json()["error"]["message"] and "FULL_DUPLEX_STREAMED" in refused.text
        assert {e.instance: e.requests_served() for e in engines} == before  # nothing sent round robin
        assert "every request is refused 500" in streamed_body_gateway.log.read_text()

    def test_requests_go_only_to_the_endpoints_of_the_subset_the_proxy_names(self, subset_gateway: Gateway,
                                                                            engines: list[Engine]) -> None:
        _wait_routable(subset_gateway, len(engines))
        before = {e.instance: e.requests_served() for e in engines}
        served = {httpx.post(f"{subset_gateway.url}/v1/chat/completions", json=_chat(f"subset {i}", 2, False),
                             timeout=30).headers[SERVED] for i in range(8)}
        assert served == {engines[1].address}
        assert engines[0].requests_served() == before[engines[0].instance]  # not one went outside the subset

    def test_streamed_chat_completion_lands_on_the_endpoint_the_picker_chose(self, gateway: Gateway,
                                                                             engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        streams_land_where_picked(gateway, engines)

    def test_a_whole_answer_reaches_the_client_whole(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=_chat("a whole answer", 12, False), timeout=30)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 12 and r.json()["choices"][0]["message"]["content"]
        assert r.headers[SERVED] in {e.address for e in engines}

    def test_a_body_envoy_sends_in_many_chunks_reaches_the_engine_whole(self, gateway: Gateway,
                                                                       engines: list[Engine]) -> None:
        """A ~600 KB prompt comes to the picker in several chunks and goes back in several: the engine reads the same
        prompt as when it is sent to it directly (its own count of the prompt's tokens, in its refusal of a prompt
        longer than its context)."""
        _wait_routable(gateway, len(engines))
        body = _chat(" ".join(f"w{i}" for i in range(100_000)), 1, False)
        through = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
        direct = httpx.post(f"http://{through.headers[SERVED]}/v1/chat/completions", json=body, timeout=120)
        assert through.status_code == direct.status_code == 400
        assert through.json() == direct.json()
        assert re.search(r"prompt has \d{6} tokens", through.json()["error"]["message"])

    def test_no_endpoint_for_the_model_is_503(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        r = no_endpoint_answer(gateway.url)
        assert r.status_code == 503 and "no-such-model" in r.json()["error"]["message"]

    def test_malformed_body_is_400_and_the_picker_keeps_serving(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        *bad, fine = malformed_then_fine(gateway.url)
        assert [r.status_code for r in bad] == [400] * len(bad)
        assert fine.status_code == 200

    def test_models_and_health_are_answered_by_the_picker(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        assert [m["id"] for m in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]] == [MODEL]
        health = httpx.get(f"{gateway.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["endpoints"] == len(engines)
