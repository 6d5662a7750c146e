"""Engine reports authenticated per instance: keys derived from one master key, every report and KV message
signed with its instance's key and stamped (process epoch, number per kind), and a picker holding the master key
taking only what the claimed instance signed, newer than what it took last of that instance."""

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
from shared.core.kv_events import BlockRemoved, BlockStored, KVEventBatch
from shared.core.routing import Router, builtin_config
from shared.host.engine_feed import EngineFeed, take_kv_events, take_metrics
from shared.host.report_auth import (
    KV,
    MASTER_KEY_ENV,
    METRICS,
    SIGNATURE_HEADER,
    ReportSigner,
    ReportVerifier,
    Verdict,
    derive_key,
    master_key_text,
    parse_key,
    sign,
    signed_headers,
)

MASTER = bytes(range(32))
NOW = 1_000.0
EPOCH = int(NOW * 1e9)  # a process started at NOW (the verifiers below read NOW off their wall clock)


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


def signer(instance: str, epoch: int = EPOCH) -> ReportSigner:
    return ReportSigner(derive_key(MASTER, instance), epoch)


def signed(instance: str, data: bytes, key_of: str | None = None, by: ReportSigner | None = None) -> Msg:
    """``data`` published on ``instance``'s subject, signed with the key of ``key_of`` (default: the same), by
    ``by`` when given (its next number), else by a fresh process of epoch EPOCH (number 0)."""
    by = by or signer(key_of or instance)
    return Msg(f"gantry.engine.metrics.{instance}", data, signed_headers(by, METRICS, data))


def verifier(**kw: object) -> ReportVerifier:
    return ReportVerifier(MASTER, wall=lambda: NOW, **kw)  # type: ignore[arg-type]


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


def kv_message(instance: str, seq: int, block: int) -> bytes:
    batch = KVEventBatch(ts=NOW, events=[BlockStored(block_hashes=[block], parent_block_hash=None,
                                                       token_ids=[0] * 16, block_size=16)])
    return encode(EngineKVEvents(instance_id=instance, model="m", seq=seq, batch=batch))


def kv_signed(instance: str, data: bytes, by: ReportSigner) -> Msg:
    return Msg(f"gantry.engine.kv.{instance}", data, signed_headers(by, KV, data))


def test_the_derived_key_is_hmac_of_the_label_and_the_instance_id() -> None:
    want = hmac.new(MASTER, b"gantry-engine-report\0e1", hashlib.sha256).digest()
    assert derive_key(MASTER, "e1") == want
    assert derive_key(MASTER, "e2") != want
    assert derive_key(bytes(32), "e1") != want


def test_a_signature_is_the_stamp_and_the_hex_hmac_of_the_stamp_and_the_payload() -> None:
    key = derive_key(MASTER, "e1")
    assert sign(key, b"abc", 17, 3) == "17.3." + hmac.new(key, b"17.3.abc", hashlib.sha256).hexdigest()
    by = ReportSigner(key, 17)
    assert signed_headers(by, METRICS, b"abc") == {SIGNATURE_HEADER: sign(key, b"abc", 17, 0)}
    assert signed_headers(by, METRICS, b"abc") == {SIGNATURE_HEADER: sign(key, b"abc", 17, 1)}
    assert signed_headers(by, KV, b"abc") == {SIGNATURE_HEADER: sign(key, b"abc", 17, 0)}  # a number per kind
    assert signed_headers(None, METRICS, b"abc") is None


def test_a_report_signed_by_its_instance_is_accepted() -> None:
    data = report("e1", 8001)
    assert verifier().check("e1", data, signed("e1", data).headers, METRICS) is Verdict.ACCEPTED


def test_a_report_signed_with_another_instances_key_is_forged() -> None:
    data = report("e2", 8001)
    assert verifier().check("e2", data, signed("e2", data, key_of="e1").headers, METRICS) is Verdict.FORGED


def test_a_report_altered_after_signing_is_forged() -> None:
    headers = signed("e1", report("e1", 8001)).headers
    assert verifier().check("e1", report("e1", 8001, waiting=9), headers, METRICS) is Verdict.FORGED


def test_a_report_whose_stamp_was_altered_after_signing_is_forged() -> None:
    data = report("e1", 8001)
    headers = signed("e1", data).headers
    assert headers is not None
    bumped = headers[SIGNATURE_HEADER].replace(f"{EPOCH}.0.", f"{EPOCH}.9.", 1)
    assert verifier().check("e1", data, {SIGNATURE_HEADER: bumped}, METRICS) is Verdict.FORGED


def test_a_report_without_a_stamped_signature_is_unsigned() -> None:
    v, data = verifier(), report("e1", 8001)
    assert v.check("e1", data, None, METRICS) is Verdict.UNSIGNED
    assert v.check("e1", data, {"Other": "x"}, METRICS) is Verdict.UNSIGNED
    unstamped = hmac.new(derive_key(MASTER, "e1"), data, hashlib.sha256).hexdigest()  # as signed before stamps
    assert v.check("e1", data, {SIGNATURE_HEADER: unstamped}, METRICS) is Verdict.UNSIGNED


def test_a_signature_header_with_characters_beyond_ascii_is_refused_as_unsigned_not_raised() -> None:
    # hmac.compare_digest raises TypeError on non-ASCII text: one forged header must not escape as an exception
    v, data = verifier(), report("e1", 8001)
    assert v.admit("e1", data, {SIGNATURE_HEADER: f"{EPOCH}.0." + "\u00e9" * 64}, "s", METRICS) is Verdict.UNSIGNED
    assert v.dropped == 1


def test_a_replayed_report_is_refused() -> None:
    v, by, data = verifier(), signer("e1"), report("e1", 8001)
    first = signed("e1", data, by=by)
    assert v.check("e1", data, first.headers, METRICS) is Verdict.ACCEPTED
    assert v.check("e1", data, signed("e1", data, by=by).headers, METRICS) is Verdict.ACCEPTED
    assert v.check("e1", data, first.headers, METRICS) is Verdict.REPLAYED


def test_a_report_older_than_the_last_taken_is_refused_as_reordered() -> None:
    v, by, data = verifier(), signer("e1"), report("e1", 8001)
    older, newer = signed("e1", data, by=by), signed("e1", data, by=by)
    assert v.check("e1", data, newer.headers, METRICS) is Verdict.ACCEPTED
    assert v.check("e1", data, older.headers, METRICS) is Verdict.REPLAYED


def test_load_reports_and_kv_messages_are_numbered_apart() -> None:
    v, by, data = verifier(), signer("e1"), report("e1", 8001)
    for _ in range(3):
        assert v.check("e1", data, signed("e1", data, by=by).headers, METRICS) is Verdict.ACCEPTED
    kv = kv_message("e1", 0, 1)
    assert v.check("e1", kv, kv_signed("e1", kv, by).headers, KV) is Verdict.ACCEPTED  # KV number 0 after 3 reports


def test_a_restarted_server_counting_from_zero_again_is_accepted() -> None:
    v, data = verifier(), report("e1", 8001)
    before = signer("e1", EPOCH - 5_000_000_000)
    for _ in range(3):
        assert v.check("e1", data, signed("e1", data, by=before).headers, METRICS) is Verdict.ACCEPTED
    assert v.check("e1", data, signed("e1", data, by=signer("e1")).headers, METRICS) is Verdict.RESTARTED


def test_a_message_of_the_process_before_a_restart_is_refused() -> None:
    v, data = verifier(), report("e1", 8001)
    before, after = signer("e1", EPOCH - 5_000_000_000), signer("e1")
    recorded = [signed("e1", data, by=before) for _ in range(10)]
    assert v.check("e1", data, recorded[0].headers, METRICS) is Verdict.ACCEPTED
    assert v.check("e1", data, signed("e1", data, by=after).headers, METRICS) is Verdict.RESTARTED
    assert v.check("e1", data, recorded[9].headers, METRICS) is Verdict.REPLAYED  # numbered higher, but older


def test_a_process_started_too_far_ahead_of_the_pickers_clock_is_refused() -> None:
    v, data = verifier(max_ahead_s=3.0), report("e1", 8001)
    ahead = signer("e1", EPOCH + 4_000_000_000)
    assert v.check("e1", data, signed("e1", data, by=ahead).headers, METRICS) is Verdict.AHEAD
    within = signer("e1", EPOCH + 2_000_000_000)  # a clock 2 s fast is within the skew a report's time may have
    assert v.check("e1", data, signed("e1", data, by=within).headers, METRICS) is Verdict.ACCEPTED


def test_refused_reports_are_counted_per_kind_and_reason_and_logged_at_a_bounded_rate(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    v = verifier(log_every_s=10.0, clock=lambda: now[0])
    for _ in range(50):
        assert v.admit("e1", b"x", None, "gantry.engine.metrics.e1", METRICS) is Verdict.UNSIGNED
    now[0] = 11.0
    assert v.admit("e1", b"x", {SIGNATURE_HEADER: "1.2." + "0" * 64}, "gantry.engine.kv.e1", KV) is Verdict.FORGED
    assert v.dropped == 51
    assert v.refused[METRICS, Verdict.UNSIGNED] == 50 and v.refused[KV, Verdict.FORGED] == 1
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 2 and "no stamped signature" in lines[0] and "not signed by" in lines[1]


def test_the_key_cache_stays_bounded_under_forged_ids() -> None:
    v = verifier(max_keys=8)
    for i in range(100):
        v.check(f"forged-{i}", b"x", {SIGNATURE_HEADER: "1.2." + "0" * 64}, METRICS)
    assert v.cached() <= 8
    data = report("e1", 8001)
    assert v.check("e1", data, signed("e1", data).headers, METRICS) is Verdict.ACCEPTED  # evicted or not


def test_the_stamps_remembered_stay_bounded_and_only_genuine_messages_add_one() -> None:
    v = verifier(max_keys=4)
    for i in range(100):
        v.check(f"forged-{i}", b"x", {SIGNATURE_HEADER: f"{EPOCH}.0." + "0" * 64}, METRICS)
    assert v.stamped() == 0
    for i in range(10):
        data = report(f"e{i}", 8001)
        assert v.check(f"e{i}", data, signed(f"e{i}", data).headers, METRICS) is Verdict.ACCEPTED
    assert v.stamped() == 4


async def test_a_picker_with_the_master_key_takes_genuine_reports_and_drops_forged_ones() -> None:
    feed, dead = feed_with(verifier()), bus()
    await take_metrics(feed, dead, signed("e1", report("e1", 8001)), NOW)
    forged = report("e2", 9999, waiting=50)  # e1's server claiming instance e2
    await take_metrics(feed, dead, signed("e2", forged, key_of="e1"), NOW)
    await take_metrics(feed, dead, Msg("gantry.engine.metrics.e3", report("e3", 9998), None), NOW)
    assert set(feed.pool.endpoints) == {"e1"}
    assert feed.verifier is not None and feed.verifier.dropped == 2
    assert dead.dead == [("gantry.engine.metrics.e2", "claiming instance 'e2': not signed by the instance it claims"),
                         ("gantry.engine.metrics.e3", "claiming instance 'e3': no stamped signature")]


async def test_a_forged_report_does_not_change_a_genuine_instances_load() -> None:
    feed = feed_with(verifier())
    await take_metrics(feed, bus(), signed("e2", report("e2", 8002, waiting=1)), NOW)
    await take_metrics(feed, bus(), signed("e2", report("e2", 9999, waiting=90), key_of="e1"), NOW + 0.01)
    metrics = feed.router.state.endpoints["e2"].metrics
    assert metrics is not None and metrics.waiting == 1
    assert feed.pool.endpoints["e2"].address == "127.0.0.1:8002"


async def test_a_replayed_idle_report_does_not_replace_a_busy_one_and_goes_to_the_dead_letters() -> None:
    feed, dead, by = feed_with(verifier()), bus(), signer("e1")
    idle = signed("e1", report("e1", 8001, waiting=0), by=by)
    await take_metrics(feed, dead, idle, NOW)
    await take_metrics(feed, dead, signed("e1", report("e1", 8001, waiting=40), by=by), NOW + 0.1)
    await take_metrics(feed, dead, idle, NOW + 0.2)
    metrics = feed.router.state.endpoints["e1"].metrics
    assert metrics is not None and metrics.waiting == 40
    assert [reason for _, reason in dead.dead] == ["claiming instance 'e1': a replay (stamp not newer than the "
                                                   "last taken)"]


async def test_kv_events_are_checked_as_reports_are() -> None:
    feed = feed_with(verifier())
    await take_metrics(feed, bus(), signed("e1", report("e1", 8001)), NOW)
    data = kv_message("e1", 0, 1)
    dead = bus()
    await take_kv_events(feed, dead, kv_signed("e1", data, signer("e2")))
    assert "e1" not in feed._kv_seq
    assert [subject for subject, _ in dead.dead] == ["gantry.engine.kv.e1"]
    await take_kv_events(feed, bus(), kv_signed("e1", data, signer("e1")))
    assert feed._kv_seq["e1"] == 1


async def test_a_replayed_kv_message_of_blocks_since_evicted_is_refused() -> None:
    feed, dead, by = feed_with(verifier()), bus(), signer("e1")
    await take_metrics(feed, dead, signed("e1", report("e1", 8001), by=by), NOW)
    stored = kv_signed("e1", kv_message("e1", 0, 7), by)
    await take_kv_events(feed, dead, stored)
    evicted = encode(EngineKVEvents(instance_id="e1", model="m", seq=1,
                                    batch=KVEventBatch(ts=NOW, events=[BlockRemoved(block_hashes=[7])])))
    await take_kv_events(feed, dead, kv_signed("e1", evicted, by))
    await take_kv_events(feed, dead, stored)
    state = feed.router.state
    assert not state.precise.holds(state.endpoints["e1"].slot, 7)
    assert [subject for subject, _ in dead.dead] == ["gantry.engine.kv.e1"]


async def test_a_restarted_servers_kv_messages_start_from_an_empty_cache_and_are_taken() -> None:
    feed, dead = feed_with(verifier()), bus()
    before, after = signer("e1", EPOCH - 5_000_000_000), signer("e1")
    await take_metrics(feed, dead, signed("e1", report("e1", 8001), by=before), NOW)
    for seq in range(5):
        await take_kv_events(feed, dead, kv_signed("e1", kv_message("e1", seq, 100 + seq), before))
    await take_metrics(feed, dead, signed("e1", report("e1", 8001), by=after), NOW + 0.1)
    assert "e1" not in feed._kv_seq  # the restart was seen on the load report: the old cache is gone already
    await take_kv_events(feed, dead, kv_signed("e1", kv_message("e1", 2, 200), after))  # 0 and 1 lost
    assert feed._kv_seq["e1"] == 3 and dead.dead == []
    old = kv_signed("e1", kv_message("e1", 9, 109), before)  # recorded before the restart, never delivered
    await take_kv_events(feed, dead, old)
    assert feed._kv_seq["e1"] == 3 and [subject for subject, _ in dead.dead] == ["gantry.engine.kv.e1"]


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
