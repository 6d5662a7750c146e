"""Engine reports authenticated per instance: keys derived from one master key, every report and KV message
signed with its instance's key, and a picker holding the master key taking only what the claimed instance signed."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client

from shared.bus.messages import EngineKVEvents, EngineMetrics, encode
from shared.bus.runtime import Bus
from shared.core.kv_events import BlockStored, KVEventBatch
from shared.core.routing import Router, builtin_config
from shared.host.engine_feed import EngineFeed, take_kv_events, take_metrics
from shared.host.report_auth import (
    MASTER_KEY_ENV,
    SIGNATURE_HEADER,
    ReportVerifier,
    derive_key,
    master_key_text,
    parse_key,
    sign,
    signed_headers,
)

MASTER = bytes(range(32))
NOW = 1_000.0


@dataclass(frozen=True)
class Msg:
    """A delivered message as the feed reads it (what nats-py's Msg and the relay's frames both carry)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None


def report(instance: str, port: int, waiting: int = 0) -> bytes:
    return encode(EngineMetrics(instance_id=instance, model="m", url=f"http://127.0.0.1:{port}", ts=NOW,
                                num_requests_running=0, num_requests_waiting=waiting, kv_cache_usage_perc=0.1,
                                block_size=16, num_gpu_blocks=1000))


def signed(instance: str, data: bytes, key_of: str | None = None) -> Msg:
    """``data`` published on ``instance``'s subject, signed with the key of ``key_of`` (default: the same)."""
    return Msg(f"gantry.engine.metrics.{instance}", data, signed_headers(derive_key(MASTER, key_of or instance), data))


def feed_with(verifier: ReportVerifier | None) -> EngineFeed:
    return EngineFeed(Router(builtin_config("default")), expire_s=3.0, verifier=verifier)


class RecordingBus(Bus):
    """A bus whose dead letters are kept here (never connected: nothing else of it is used by the feed)."""

    def __init__(self) -> None:
        super().__init__(Client(), "test")
        self.dead: list[tuple[str, str]] = []

    async def dead_letter(self, subject: str, reason: str, payload: bytes = b"") -> None:
        self.dead.append((subject, reason))


def bus() -> RecordingBus:
    return RecordingBus()


def test_the_derived_key_is_hmac_of_the_label_and_the_instance_id() -> None:
    want = hmac.new(MASTER, b"gantry-engine-report\0e1", hashlib.sha256).digest()
    assert derive_key(MASTER, "e1") == want
    assert derive_key(MASTER, "e2") != want
    assert derive_key(bytes(32), "e1") != want


def test_a_signature_is_the_hex_hmac_of_the_payload() -> None:
    key = derive_key(MASTER, "e1")
    assert sign(key, b"abc") == hmac.new(key, b"abc", hashlib.sha256).hexdigest()
    assert signed_headers(key, b"abc") == {SIGNATURE_HEADER: sign(key, b"abc")}
    assert signed_headers(None, b"abc") is None


def test_a_report_signed_by_its_instance_is_valid() -> None:
    data = report("e1", 8001)
    assert ReportVerifier(MASTER).valid("e1", data, signed("e1", data).headers)


def test_a_report_signed_with_another_instances_key_is_not() -> None:
    data = report("e2", 8001)
    assert not ReportVerifier(MASTER).valid("e2", data, signed("e2", data, key_of="e1").headers)


def test_a_report_altered_after_signing_is_not_valid() -> None:
    data = report("e1", 8001)
    headers = signed("e1", data).headers
    assert not ReportVerifier(MASTER).valid("e1", report("e1", 8001, waiting=9), headers)


def test_a_report_without_a_signature_is_not_valid() -> None:
    verifier = ReportVerifier(MASTER)
    assert not verifier.valid("e1", report("e1", 8001), None)
    assert not verifier.valid("e1", report("e1", 8001), {"Other": "x"})


def test_dropped_reports_are_counted_and_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    verifier = ReportVerifier(MASTER, log_every_s=10.0, clock=lambda: now[0])
    for _ in range(50):
        assert not verifier.accepts("e1", b"x", None, "gantry.engine.metrics.e1")
    now[0] = 11.0
    assert not verifier.accepts("e1", b"x", {SIGNATURE_HEADER: "00"}, "gantry.engine.metrics.e1")
    assert verifier.dropped == 51
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 2 and "no signature" in lines[0] and "wrong signature" in lines[1]


def test_the_key_cache_stays_bounded_under_forged_ids() -> None:
    verifier = ReportVerifier(MASTER, max_keys=8)
    for i in range(100):
        verifier.valid(f"forged-{i}", b"x", {SIGNATURE_HEADER: "00"})
    assert verifier.cached() <= 8
    data = report("e1", 8001)
    assert verifier.valid("e1", data, signed("e1", data).headers)  # a key evicted or not, the verdict holds


async def test_a_picker_with_the_master_key_takes_genuine_reports_and_drops_forged_ones() -> None:
    feed, dead = feed_with(ReportVerifier(MASTER)), bus()
    await take_metrics(feed, dead, signed("e1", report("e1", 8001)), NOW)
    forged = report("e2", 9999, waiting=50)  # e1's server claiming instance e2
    await take_metrics(feed, dead, signed("e2", forged, key_of="e1"), NOW)
    await take_metrics(feed, dead, Msg("gantry.engine.metrics.e3", report("e3", 9998), None), NOW)
    assert set(feed.pool.endpoints) == {"e1"}
    assert feed.verifier is not None and feed.verifier.dropped == 2
    assert [subject for subject, _ in dead.dead] == ["gantry.engine.metrics.e2", "gantry.engine.metrics.e3"]
    assert all("not signed by instance" in reason for _, reason in dead.dead)


async def test_a_forged_report_does_not_change_a_genuine_instances_load() -> None:
    feed = feed_with(ReportVerifier(MASTER))
    await take_metrics(feed, bus(), signed("e2", report("e2", 8002, waiting=1)), NOW)
    await take_metrics(feed, bus(), signed("e2", report("e2", 9999, waiting=90), key_of="e1"), NOW + 0.01)
    metrics = feed.router.state.endpoints["e2"].metrics
    assert metrics is not None and metrics.waiting == 1
    assert feed.pool.endpoints["e2"].address == "127.0.0.1:8002"


async def test_kv_events_are_checked_as_reports_are() -> None:
    feed = feed_with(ReportVerifier(MASTER))
    await take_metrics(feed, bus(), signed("e1", report("e1", 8001)), NOW)
    batch = KVEventBatch(ts=NOW, events=[BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[0] * 16,
                                                       block_size=16)])
    data = encode(EngineKVEvents(instance_id="e1", model="m", seq=0, batch=batch))
    forged = Msg("gantry.engine.kv.e1", data, signed_headers(derive_key(MASTER, "e2"), data))
    dead = bus()
    await take_kv_events(feed, dead, forged)
    assert "e1" not in feed._kv_seq
    assert [subject for subject, _ in dead.dead] == ["gantry.engine.kv.e1"]
    await take_kv_events(feed, bus(), Msg("gantry.engine.kv.e1", data, signed_headers(derive_key(MASTER, "e1"), data)))
    assert feed._kv_seq["e1"] == 1


async def test_a_picker_without_a_master_key_takes_every_report_as_before() -> None:
    feed, dead = feed_with(None), bus()
    await take_metrics(feed, dead, Msg("gantry.engine.metrics.e1", report("e1", 8001), None), NOW)
    await take_metrics(feed, dead, signed("e2", report("e2", 8002), key_of="e1"), NOW)
    assert set(feed.pool.endpoints) == {"e1", "e2"} and dead.dead == []


def test_a_key_must_be_hex_of_at_least_16_bytes() -> None:
    assert parse_key(MASTER.hex(), "k") == MASTER
    with pytest.raises(ValueError, match="not hex"):
        parse_key("zz", "k")
    with pytest.raises(ValueError, match="shorter"):
        parse_key("00" * 8, "k")


def test_the_master_key_comes_from_the_environment_else_the_named_credentials_file(tmp_path: Path) -> None:
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"identities": {}, "engine_report_key": "ab" * 32}))
    assert master_key_text({MASTER_KEY_ENV: "cd" * 32}, str(creds)) == "cd" * 32
    assert master_key_text({}, str(creds)) == "ab" * 32
    assert master_key_text({}, "") is None  # no file named: no key (a gateway without placement)
    creds.write_text(json.dumps({"identities": {}}))
    assert master_key_text({}, str(creds)) is None


def test_the_nats_picker_checks_reports_when_its_environment_holds_the_master_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from services.picker.__main__ import parse_args

    monkeypatch.delenv("GANTRY_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv(MASTER_KEY_ENV, MASTER.hex())
    assert parse_args(["--nats-url", "nats://h:4222"]).report_master == MASTER
    monkeypatch.delenv(MASTER_KEY_ENV)
    assert parse_args(["--nats-url", "nats://h:4222"]).report_master is None
