"""The gateway on its ext_authz transport end to end: real Envoy, Gantry's picker answering Envoy's HTTP
authorization checks and reading Envoy's gRPC access log, real NATS, real emulated engine servers. The same
behaviours as the ext_proc path (tests/integration/test_gateway.py, whose fixtures these reuse), checked where
the request landed (the engine's own counters) and in the picker's books (its ``/stats``)."""

from __future__ import annotations

import re
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.envoy import SERVED, FailureMode, start_envoy
from ops.servers import ServerProcess, free_port
from services.gateway.protocol import GRPC_SOCKET, HTTP_SOCKET, SUBSET_KEY, PickerTransport
from tests.integration.test_gateway import (
    AT_ONCE_S,
    MODEL,
    Engine,
    Gateway,
    OnSharedEngines,
    _chat,
    _engines,
    _gateway,
    _wait_routable,
    after_endpoint_kill,
    gateway_marks,
    health_once_the_picker_answers,
    listened_after_hearing,
    malformed_then_fine,
    no_endpoint_answer,
    private_listeners,
    restarted_under_traffic,
    shed_and_kept_on_a_busy_engine,
    streams_land_where_picked,
)

pytestmark = gateway_marks(120)


def _authz_gateway(nats_url: str, tmp_path: Path, failure_mode: FailureMode = FailureMode.FAIL_CLOSE,
                   replicas: int = 1) -> Iterator[Gateway]:
    return _gateway(nats_url, tmp_path, replicas, "--staleness-s", "2", failure_mode=failure_mode,
                    transport=PickerTransport.EXT_AUTHZ)


@pytest.fixture
def gateway(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    yield from _authz_gateway(nats_server.url, tmp_path)


@pytest.fixture
def engines(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    yield from _engines(nats_server.url, tmp_path, 2)


def _settled(gw: Gateway, replica: int = 0, timeout: float = 15) -> dict[str, Any]:
    """A picker replica's books once nothing is in flight (the access log's entries arrive within its flush
    interval; on a loaded host the picker reads them later)."""
    deadline = time.monotonic() + timeout
    while (got := gw.stats(replica))["inflight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_health_is_503_while_the_picker_knows_no_endpoint(gateway: Gateway) -> None:
    r = health_once_the_picker_answers(gateway.url)
    assert r.status_code == 503 and "no endpoint" in r.json()["error"]["message"]


def test_sheddable_request_is_429_when_the_pool_is_saturated(gateway: Gateway, nats_server: ServerProcess,
                                                             tmp_path: Path) -> None:
    assert shed_and_kept_on_a_busy_engine(gateway, nats_server.url, tmp_path) == (429, 200)


def test_killed_endpoint_falls_back_and_the_load_moves_to_the_one_that_served(
        gateway: Gateway, engines: list[Engine], nats_server: ServerProcess) -> None:
    _wait_routable(gateway, len(engines))
    dead, alive = engines
    moved = _settled(gateway)["moved"]
    rerouted = after_endpoint_kill(gateway.url, nats_server.url, dead, alive)
    books = _settled(gateway)
    assert books["moved"] - moved == len(rerouted)  # the access log named the fallback that served each
    assert books["inflight"] == 0 and set(books["endpoints"].values()) == {0}
    assert gateway.log.read_text().count(f"served by fallback {alive.instance}") == len(rerouted)


def _after_picker_killed(nats_url: str, tmp_path: Path, failure_mode: FailureMode,
                         engines: list[Engine]) -> tuple[list[int], int]:
    """The codes of 5 requests sent once the gateway's only picker is killed, and the requests the engines had
    served when it was (with FailOpen, warm-up requests are served before the picker listens)."""
    gen = _authz_gateway(nats_url, tmp_path, failure_mode)
    gw = next(gen)
    try:
        _wait_routable(gw, len(engines))
        served = sum(e.requests_served() for e in engines)
        gw.picker.send_signal(signal.SIGKILL)
        gw.picker.wait(5)
        codes = []
        for i in range(5):
            t = time.monotonic()
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat(f"no picker {i}", 2, False), timeout=10)
            assert time.monotonic() - t < AT_ONCE_S  # at once, not after a timeout
            codes.append(r.status_code)
        return codes, served
    finally:
        gen.close()


def _heard(gw: Gateway, replica: int) -> int:
    """How many engines a picker replica's pool holds; -1 while its socket is not listening yet (one routable
    replica is not all three: on a loaded host the others bound their sockets later, and CI once failed here)."""
    try:
        return len(gw.stats(replica)["endpoints"])
    except httpx.TransportError:
        return -1


class TestOnEnginesLeftAsFound(OnSharedEngines):
    """Behaviours that leave the engines (and the plain gateway) as they found them share them: two engines and one
    gateway for the class, each started once (an engine's start is most of a test's ~2 s setup). Every check here
    is relative to the engines' counters and the picker's books before it, so the order of the tests does not
    matter. Tests that kill, add or count engines of their own (the pool's size with none, a busy engine) keep
    fresh ones. The tests with gateways of their own come first, before the class's gateway starts."""

    @pytest.fixture(scope="class")
    @classmethod
    def gateway(cls, nats_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
        yield from _authz_gateway(nats_server.url, tmp_path_factory.mktemp("gateway"))

    def test_fail_close_with_the_picker_dead_refuses_at_once(self, nats_server: ServerProcess, tmp_path: Path,
                                                             engines: list[Engine]) -> None:
        codes, served = _after_picker_killed(nats_server.url, tmp_path, FailureMode.FAIL_CLOSE, engines)
        assert codes == [500] * 5
        assert sum(e.requests_served() for e in engines) == served  # none of the five reached an engine

    def test_fail_open_with_the_picker_dead_serves_on_the_models_servers(self, nats_server: ServerProcess,
                                                                         tmp_path: Path,
                                                                         engines: list[Engine]) -> None:
        codes, served = _after_picker_killed(nats_server.url, tmp_path, FailureMode.FAIL_OPEN, engines)
        assert codes == [200] * 5
        time.sleep(0.05)
        assert sum(e.requests_served() for e in engines) == served + 5

    def test_killed_picker_replica_checks_go_to_the_others_each_keeps_its_own_books_and_restarted_it_decides_again(
            self, nats_server: ServerProcess, tmp_path: Path, engines: list[Engine]) -> None:
        gen = _authz_gateway(nats_server.url, tmp_path, replicas=3)
        gw = next(gen)
        try:
            _wait_routable(gw, len(engines))
            deadline = time.monotonic() + 30  # every replica heard every engine (each one's pool, from its own socket)
            while (heard := [_heard(gw, p) for p in range(len(gw.pickers))]) != [len(engines)] * 3:
                assert time.monotonic() < deadline, f"picker replicas' pools never filled: {heard} of {len(engines)}"
                time.sleep(0.05)
            gw.pickers[0].send_signal(signal.SIGKILL)
            gw.pickers[0].wait(5)
            codes = []
            for i in range(30):
                r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat(f"after picker kill {i}", 2, False),
                               timeout=30)
                codes.append(r.status_code)
                time.sleep(0.05)
            assert codes == [200] * 30  # a check the dead replica refused was sent to a live one
            live = range(1, len(gw.pickers))
            deadline = time.monotonic() + 15
            while any(gw.stats(p)["inflight"] for p in live) and time.monotonic() < deadline:
                time.sleep(0.05)
            books = [gw.stats(p) for p in live]
            # every replica heard every request's end, and ended exactly the ones it routed
            assert [b["inflight"] for b in books] == [0, 0]
            assert all(set(b["endpoints"].values()) == {0} for b in books)
            assert all(b["finished"] == b["picks"] for b in books)
            assert sum(b["picks"] for b in books) >= 30
            # the dead replica started again under traffic: no check fails on the way, and once back it decides its
            # share, whose ends reach it (Envoy's access-log stream to it opened again)
            run = restarted_under_traffic(gw)
            failed = [(round(t, 2), code, why) for t, code, why in run.answers if code != 200]
            print(f"{len(run.answers)} requests, back after {run.back_at:.2f} s, {run.calls_after} calls since;",
                  "failed:", failed)
            assert not failed, failed
            assert sum(0 < t < run.back_at for t, _, _ in run.answers) >= 10
            assert sum(t > run.back_at for t, _, _ in run.answers) >= 10
            assert run.calls_after >= 3
            assert listened_after_hearing(run.log, engines)
            books = [_settled(gw, p) for p in range(len(gw.pickers))]
            assert books[0]["picks"] >= run.calls_after  # the restarted replica's own books
            assert [b["inflight"] for b in books] == [0, 0, 0]
            assert all(b["finished"] == b["picks"] for b in books)
        finally:
            gen.close()

    def test_requests_go_only_to_the_endpoints_of_the_subset_the_gateway_names_and_none_known_is_503(
            self, nats_server: ServerProcess, tmp_path: Path, engines: list[Engine]) -> None:
        """GIE's subset hint on this transport: the header the gateway sets (``EnvoyOptions.subset_hint``) reaches
        the check, where ext_proc's metadata could not, and is read as ext_proc reads its metadata. A client's own
        hint is removed before it."""
        gen = _gateway(nats_server.url, tmp_path, 1, "--staleness-s", "2", transport=PickerTransport.EXT_AUTHZ,
                       subset_hint=(engines[1].address,))
        gw = next(gen)
        try:
            _wait_routable(gw, len(engines))
            before = {e.instance: e.requests_served() for e in engines}
            served = [httpx.post(f"{gw.url}/v1/chat/completions", json=_chat(f"subset {i}", 2, False), timeout=30,
                                 headers={SUBSET_KEY: engines[0].address} if i % 2 else {}).headers[SERVED]
                      for i in range(8)]
            assert served == [engines[1].address] * 8
            time.sleep(0.05)
            assert engines[1].requests_served() == before[engines[1].instance] + 8  # counted where they landed
            assert engines[0].requests_served() == before[engines[0].instance]  # and none outside the subset
            # a second Envoy in front of the same picker, its hint naming no engine the picker knows
            assert gw.envoy_opts is not None
            with tempfile.TemporaryDirectory(prefix="ga-") as admin:
                other = start_envoy(replace(gw.envoy_opts, listen_port=free_port(), admin_port=Path(admin) / "a.sock",
                                            subset_hint=("127.0.0.1:1",), access_log=None), tmp_path / "envoy-none",
                                    timeout=60)
                try:
                    refused = httpx.post(f"{other.url}/v1/chat/completions", json=_chat("no subset", 2, False),
                                         timeout=30)
                finally:
                    other.stop()
            assert refused.status_code == 503 and "subset" in refused.json()["error"]["message"], refused.text
            assert engines[0].requests_served() == before[engines[0].instance]
            assert engines[1].requests_served() == before[engines[1].instance] + 8
        finally:
            gen.close()

    def test_a_client_cannot_choose_the_engine_when_no_picker_decides(self, nats_server: ServerProcess, tmp_path: Path,
                                                                     engines: list[Engine]) -> None:
        """FailOpen with the picker dead: Envoy's own choice among the model's servers, not the destination a client
        names (the override policy would follow that header)."""
        gen = _authz_gateway(nats_server.url, tmp_path, FailureMode.FAIL_OPEN)
        gw = next(gen)
        try:
            _wait_routable(gw, len(engines))
            gw.picker.send_signal(signal.SIGKILL)
            gw.picker.wait(5)
            served = []
            for i in range(6):
                r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat(f"chosen {i}", 2, False), timeout=10,
                               headers={"x-gateway-destination-endpoint": engines[0].address})
                assert r.status_code == 200
                served.append(r.headers[SERVED])
            assert set(served) == {e.address for e in engines}  # round robin, both engines
        finally:
            gen.close()

    def test_streamed_chat_lands_on_the_chosen_endpoint_and_the_access_log_ends_it(self, gateway: Gateway,
                                                                                   engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        finished = _settled(gateway)["finished"]
        streams_land_where_picked(gateway, engines, 6)
        books = _settled(gateway)
        assert books["inflight"] == 0 and set(books["endpoints"].values()) == {0}
        assert books["finished"] == finished + 6

    def test_models_are_listed_by_the_picker_through_envoy(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        got = httpx.get(f"{gateway.url}/v1/models", timeout=5)
        assert got.status_code == 200 and [m["id"] for m in got.json()["data"]] == [MODEL]

    def test_health_is_200_once_the_picker_knows_an_endpoint(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        r = httpx.get(f"{gateway.url}/health", timeout=5)
        assert r.status_code == 200 and r.json() == {"status": "ok", "endpoints": len(engines)}

    def test_no_endpoint_for_the_model_is_503(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        r = no_endpoint_answer(gateway.url)
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert "no-such-model" in r.json()["error"]["message"]

    def test_malformed_body_is_400_and_the_picker_keeps_serving(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        *bad, fine = malformed_then_fine(gateway.url)
        for r in bad:
            assert r.status_code == 400, (r.request.content[:20], r.status_code, r.text)
            assert r.json()["error"]["code"] == 400
        assert fine.status_code == 200
        assert _settled(gateway)["inflight"] == 0

    def test_the_picker_is_reached_only_through_its_private_unix_sockets(self, gateway: Gateway,
                                                                         engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))  # checks on its HTTP socket, the access log on its gRPC one
        private_listeners(gateway, GRPC_SOCKET, HTTP_SOCKET)

    def test_a_client_sent_pick_id_never_reaches_the_access_log(self, gateway: Gateway, engines: list[Engine]) -> None:
        """A forged ``x-gantry-pick-id`` on a refused or a routed request: Envoy drops it before anything reads it,
        so the access log (which ends the picker's books) names only the picker's own ids."""
        _wait_routable(gateway, len(engines))
        forged = {"x-gantry-pick-id": "forged", "x-gantry-endpoints": "forged"}
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json={**_chat("hi"), "model": "no-such-model"},
                             headers={**forged, "x-request-id": "refused-1"}, timeout=10)
        routed = httpx.post(f"{gateway.url}/v1/chat/completions", json=_chat("forging", 2, False),
                            headers={**forged, "x-request-id": "routed-1"}, timeout=10)
        assert (refused.status_code, routed.status_code) == (503, 200)
        log = gateway.envoy.log_path.parent / "access.log"
        # Envoy writes its file log every 10 s (--file-flush-interval-msec) unless its admin API asks it to reopen
        # its logs, which writes what it holds first: asked, not waited for
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(gateway.admin))) as admin:
            assert admin.post("http://envoy/reopen_logs", timeout=5).status_code == 200
        deadline = time.monotonic() + 12  # past the flush interval, should the request not have done it
        while "x-request-id=routed-1" not in (text := log.read_text()) or "x-request-id=refused-1" not in text:
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.1)
        picks = dict(re.findall(r"x-request-id=(\S+) pick=(\S+)", text))
        assert picks["refused-1"] == "-"
        assert picks["routed-1"].startswith("routed-1#") and "forged" not in picks["routed-1"]
        books = _settled(gateway)
        assert books["inflight"] == 0 and books["finished"] == books["picks"]
