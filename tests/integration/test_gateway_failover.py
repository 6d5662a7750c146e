"""Picker replicas die; requests do not. A stream of concurrent streamed chat completions runs through real
Envoy in front of 3 picker replicas while one replica is SIGKILLed mid-stream, and every request is
counted: complete (status 200 and the stream's final ``[DONE]``) or failed.

- FailOpen (GIE ``endpointPickerRef.failureMode``): not one request fails. A stream the dead replica was
  deciding is retried on another replica; one it had already routed finishes without it.
- FailClose: every request that starts after the kill completes; only streams the dead replica was
  serving at that instant may fail, and they fail at once (never hang).
- With every replica gone, FailOpen still serves each request on a server of its own model (Envoy's
  choice), FailClose refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ops.envoy import SERVED, FailureMode
from ops.servers import ServerProcess
from services.gateway.protocol import GIE_PROCESSING_MODE
from tests.integration.test_gateway import (
    AT_ONCE_S,
    MODEL,
    Engine,
    Gateway,
    _chat,
    _engines,
    _gateway,
    _start_engine,
    _stop,
    _wait_routable,
    every_replica_has_every_engine,
    gateway_marks,
)

pytestmark = gateway_marks(180)

CONCURRENCY = 6
AFTER_KILL = 12  # requests started after the kill, at least, before the storm ends
MAX_STORM_S = 40.0
# engines on this shared host report late under load; these tests are about pickers dying, not staleness
PICKER_ARGS = ("--staleness-s", "2")
STORM_S = 4.0


@dataclass(frozen=True)
class Outcome:
    """One request of the storm, times relative to the kill."""

    start: float
    end: float
    status: int
    complete: bool
    detail: str


async def _one(c: httpx.AsyncClient, url: str, body: dict[str, object]) -> tuple[float, float, int, bool, str]:
    start = time.monotonic()
    status, lines, detail = 0, [], ""
    try:
        async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                lines.append(line)
            if status != 200:
                detail = " ".join(lines)[:160]
    except httpx.HTTPError as err:  # a stream cut short (reset mid-response)
        detail = f"{type(err).__name__}: {err}"
    data = [ln for ln in lines if ln.startswith("data: ")]
    complete = status == 200 and bool(data) and data[-1] == "data: [DONE]"
    return start, time.monotonic(), status, complete, detail


def storm(url: str, kill: Callable[[], None], kill_after: float, seconds: float = STORM_S,
          concurrency: int = CONCURRENCY, model: str = MODEL) -> tuple[list[Outcome], float]:
    """``concurrency`` clients sending streamed chat completions back to back for ``seconds``, and on until
    ``AFTER_KILL`` requests started after the kill have ended (a loaded host can slow the stream; at most
    ``MAX_STORM_S``); ``kill`` runs ``kill_after`` seconds in. Returns every request's outcome, times
    relative to the kill."""

    async def run() -> tuple[list[Outcome], float]:
        out: list[tuple[float, float, int, bool, str]] = []
        t0 = time.monotonic()
        killed_at: list[float] = []
        stop, cap = t0 + seconds, t0 + MAX_STORM_S

        def going() -> bool:
            now = time.monotonic()
            if now >= cap:
                return False
            after = sum(1 for s, *_ in out if killed_at and s > killed_at[0])
            return now < stop or after < AFTER_KILL

        async def client(k: int) -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                i = 0
                while going():
                    body = {**_chat(f"client {k} request {i} about failover " * 4, 12), "model": model}
                    out.append(await _one(c, url, body))
                    i += 1

        async def killer() -> None:
            await asyncio.sleep(kill_after)
            kill()
            killed_at.append(time.monotonic())

        await asyncio.gather(killer(), *(client(k) for k in range(concurrency)))
        k = killed_at[0]
        return [Outcome(s - k, e - k, code, ok, why) for s, e, code, ok, why in out], k - t0

    return asyncio.run(run())


def _kill(proc_of: Callable[[], list[object]]) -> Callable[[], None]:
    def kill() -> None:
        for p in proc_of():
            p.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    return kill


def _epp_stats(gw: Gateway) -> dict[str, int]:
    """Envoy's retries of ext_proc streams and ejections of picker replicas (printed beside the outcome)."""
    return {k.removeprefix("cluster.gantry_epp."): v for k, v in gw.envoy_stats("cluster.gantry_epp.").items()
            if k.endswith(("upstream_rq_retry", "upstream_rq_retry_success", "ejections_enforced_total",
                           "upstream_cx_connect_fail"))}


def _report(outcomes: list[Outcome]) -> str:
    bad = [o for o in outcomes if not o.complete]
    return (f"{len(outcomes)} requests, {len(bad)} failed: "
            f"{[(round(o.start, 3), round(o.end, 3), o.status, o.detail[:100]) for o in bad[:8]]}")


@pytest.fixture
def engines(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    yield from _engines(nats_server.url, tmp_path, 2)


@pytest.fixture
def fail_open(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(nats_server.url, tmp_path, 3, *PICKER_ARGS, failure_mode=FailureMode.FAIL_OPEN)


@pytest.fixture
def fail_close(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(nats_server.url, tmp_path, 3, *PICKER_ARGS, failure_mode=FailureMode.FAIL_CLOSE)


def _ready(gw: Gateway, engines: list[Engine]) -> None:
    _wait_routable(gw, len(engines), timeout=60)
    every_replica_has_every_engine(gw, engines)  # each keeps its own snapshot and answers Envoy's health check


def _wait_out(gw: Gateway, n_out: int, timeout: float = 30.0) -> None:
    """Until Envoy's health checks count ``n_out`` picker replicas out (checks every 0.25 s, two misses; a loaded
    host delays both the checks and the answers)."""
    deadline = time.monotonic() + timeout
    while sum(h != "healthy" for h in gw.picker_health()) != n_out:
        assert time.monotonic() < deadline, gw.picker_health()
        time.sleep(0.1)


def test_fail_open_a_picker_killed_mid_stream_fails_no_request(fail_open: Gateway, engines: list[Engine]) -> None:
    _ready(fail_open, engines)
    outcomes, _ = storm(fail_open.url, _kill(lambda: [fail_open.pickers[0]]),
                        kill_after=random.uniform(0.8, 1.6))
    print(_report(outcomes), _epp_stats(fail_open))
    assert fail_open.pickers[0].poll() is not None  # it really died, mid-storm
    assert sum(o.start > 0 for o in outcomes) >= AFTER_KILL  # requests kept coming after the kill
    assert all(o.complete for o in outcomes), _report(outcomes)
    _wait_out(fail_open, 1)  # and Envoy took the dead replica out


def only_streams_the_killed_picker_held_fail(gw: Gateway, engines: list[Engine]) -> None:
    """A storm through ``gw`` with one picker replica killed mid-way: every request started after the kill
    completes; of those in flight at the kill, at most the ones it held fail, and at once."""
    _ready(gw, engines)
    outcomes, _ = storm(gw.url, _kill(lambda: [gw.pickers[0]]), kill_after=random.uniform(0.8, 1.6))
    print(_report(outcomes), _epp_stats(gw))
    assert gw.pickers[0].poll() is not None
    after = [o for o in outcomes if o.start > 0]
    assert len(after) >= AFTER_KILL
    assert all(o.complete for o in after), _report(outcomes)  # nothing new goes to the dead replica
    failed = [o for o in outcomes if not o.complete]
    # at most the streams in flight at the kill (a third of them, in expectation), none of them left hanging
    # until a timeout (Envoy ends them as the connection to the dead replica closes; the client's clock on
    # this shared host runs late, hence the margin, well below the 5 s ext_proc message timeout)
    assert len(failed) <= CONCURRENCY, _report(outcomes)
    assert all(o.start < 0 and o.end < 3.0 for o in failed), _report(outcomes)
    _wait_out(gw, 1)


def test_fail_close_only_streams_the_killed_picker_held_fail(fail_close: Gateway, engines: list[Engine]) -> None:
    only_streams_the_killed_picker_held_fail(fail_close, engines)


@pytest.mark.parametrize("failure_mode", list(FailureMode))
def test_in_gies_exchange_only_streams_the_killed_picker_held_fail_whatever_the_failure_mode(
        failure_mode: FailureMode, nats_server: ServerProcess, tmp_path: Path, engines: list[Engine]) -> None:
    """Full duplex hands every body byte to the picker: the chunks a dying replica held are gone, so even FailOpen
    cannot finish the streams it was handing back (the buffered exchange's FailOpen loses none, above)."""
    with contextlib.contextmanager(_gateway)(nats_server.url, tmp_path, 3, *PICKER_ARGS, failure_mode=failure_mode,
                                             ext_proc_mode=GIE_PROCESSING_MODE) as gw:
        only_streams_the_killed_picker_held_fail(gw, engines)


def test_a_stalled_picker_fails_its_health_check_and_is_taken_out(fail_close: Gateway,
                                                                  engines: list[Engine]) -> None:
    _ready(fail_close, engines)
    stalled = fail_close.pickers[1]
    stalled.send_signal(signal.SIGSTOP)  # alive, port open, answering nothing: TCP checks would pass
    try:
        _wait_out(fail_close, 1)
        codes = [httpx.post(f"{fail_close.url}/v1/chat/completions", json=_chat(f"while stalled {i}", 2, False),
                            timeout=30).status_code for i in range(12)]
        assert codes == [200] * 12  # no request waits on the stalled replica
    finally:
        stalled.send_signal(signal.SIGCONT)
    _wait_out(fail_close, 0)  # back in the rotation once it answers again


@pytest.fixture
def two_models(nats_server: ServerProcess, tmp_path: Path) -> Iterator[dict[str, Engine]]:
    started = [_start_engine(nats_server.url, "gw-a", tmp_path),
               _start_engine(nats_server.url, "gw-b", tmp_path, "--served-model-name", "other-model")]
    try:
        yield {MODEL: started[0], "other-model": started[1]}
    finally:
        for e in started:
            _stop(e.proc)


def _all_pickers_dead(gw: Gateway) -> None:
    for p in gw.pickers:
        p.send_signal(signal.SIGKILL)
        p.wait(5)


def test_fail_open_with_every_picker_dead_serves_each_model_on_its_own_servers(
        fail_open: Gateway, two_models: dict[str, Engine]) -> None:
    deadline = time.monotonic() + 60
    while True:  # until every replica routes to both models
        codes = [httpx.post(f"{fail_open.url}/v1/chat/completions", timeout=10,
                            json={**_chat("warm up", 1, False), "model": m}).status_code
                 for m in two_models for _ in range(3)]
        if set(codes) == {200}:
            break
        assert time.monotonic() < deadline, codes
        time.sleep(0.2)
    _all_pickers_dead(fail_open)
    for i in range(8):
        for model, engine in two_models.items():
            r = httpx.post(f"{fail_open.url}/v1/chat/completions", timeout=30,
                           json={**_chat(f"no picker {i}", 2, False), "model": model})
            assert r.status_code == 200, r.text
            assert r.headers[SERVED] == engine.address  # Envoy's choice, among the servers of that model
    r = httpx.post(f"{fail_open.url}/v1/chat/completions", timeout=30,
                   json={**_chat("no picker", 2, False), "model": "no-such-model"})
    assert r.status_code == 503  # no server of that model: refused, never sent to another model's


def test_fail_close_with_every_picker_dead_refuses_at_once(fail_close: Gateway, engines: list[Engine]) -> None:
    _wait_routable(fail_close, len(engines), timeout=60)
    _all_pickers_dead(fail_close)
    before = sum(e.requests_served() for e in engines)
    for i in range(5):
        t = time.monotonic()
        r = httpx.post(f"{fail_close.url}/v1/chat/completions", json=_chat(f"no picker {i}", 2, False), timeout=30)
        assert r.status_code == 500 and time.monotonic() - t < AT_ONCE_S, (r.status_code, r.text)
    assert sum(e.requests_served() for e in engines) == before  # nothing was sent without a decision
