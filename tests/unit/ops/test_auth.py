"""Identities and least privilege (ops.auth): rights derived from the declarations, credentials files, settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.auth import (
    ADMIN,
    ADMIN_ONLY_API,
    ROLES,
    AuthError,
    Credentials,
    nats_authorization,
    permission_table,
    permissions,
    redis_acl,
    redis_rules,
    role_contracts,
)
from ops.stack import identity_of
from services import SERVICE_COMMANDS, WORKERS_COMMAND
from shared.bus import streams, subjects
from shared.bus.validate import check_inventory_change, impersonation
from shared.core.placement.domain import GIB, Gpu, Worker
from shared.host.contract import subject_matches
from shared.paths import REPO_ROOT
from shared.settings import Settings


def covered(subject: str, allowed: tuple[str, ...]) -> bool:
    return any(subject_matches(pattern, subject) or pattern == subject for pattern in allowed)


@pytest.mark.parametrize("identity", ["filter", "fitting", "scoring", "reconciler", "workers", "engine_server"])
def test_a_service_may_publish_exactly_what_its_contract_emits(identity: str) -> None:
    contract = role_contracts()[identity]
    perms = permissions(identity)
    gantry = {p for p in perms.publish if p.startswith(subjects.PREFIX + ".")}
    assert gantry == {e.subject for e in contract.emits}
    assert {c.subject for c in contract.consumes if not c.stream} <= set(perms.subscribe)


@pytest.mark.parametrize("identity", [r for r in ROLES if r != ADMIN] + ["worker-w7"])
def test_no_identity_but_the_admin_may_purge_or_delete(identity: str) -> None:
    perms = permissions(identity)
    assert set(ADMIN_ONLY_API) <= set(perms.deny_publish)
    assert not any("PURGE" in p or ".DELETE." in p for p in perms.publish)


@pytest.mark.parametrize(
    ("stream", "consumer"),
    [("GANTRY_PIPE_REQUESTED", "filter"), ("GANTRY_PIPE_SCORED", "reconciler-commit"), ("GANTRY_CMD", "reconciler-cmd"),
     ("GANTRY_STATUS", "reconciler-status")],
)
def test_the_cli_cannot_acknowledge_a_services_messages_away(stream: str, consumer: str) -> None:
    assert not covered(f"$JS.ACK.{stream}.{consumer}.1.7.7.1700000000000000000.0", permissions("cli").publish)


def test_the_cli_may_acknowledge_its_own_replays_of_events_and_dead_letters() -> None:
    for stream in ("GANTRY_EVENTS", "GANTRY_DLQ"):
        assert covered(f"$JS.ACK.{stream}.replay1.1.7.7.1700000000000000000.0", permissions("cli").publish)


def test_a_worker_agent_speaks_only_for_itself() -> None:
    perms = permissions("worker-w7")
    assert set(perms.publish) == {subjects.worker_register("w7"), subjects.worker_heartbeat("w7"),
                                  subjects.worker_files("w7"), subjects.instance_status("w7")}
    assert not covered(subjects.worker_heartbeat("w8"), perms.publish)
    assert not covered(subjects.SCALE, perms.publish)
    assert not covered(subjects.worker_assign("w8"), perms.subscribe)
    assert covered(subjects.worker_assign("w7"), perms.subscribe)


def test_an_unknown_identity_is_refused() -> None:
    with pytest.raises(AuthError):
        permissions("mallory")


@pytest.mark.parametrize("identity", ["filter", "fitting", "scoring", "cli"])
def test_readers_get_no_write_in_redis(identity: str) -> None:
    rules = redis_rules(identity)
    assert rules is not None and "+@write" not in rules and "-@dangerous" in rules and "~gantry:*" in rules


@pytest.mark.parametrize("identity", ["gateway", "picker"])
def test_the_pickers_may_read_the_instances_hashes_only(identity: str) -> None:
    rules = redis_rules(identity) or ""
    assert [r for r in rules.split() if r.startswith("~")] == ["~gantry:inst", "~gantry:inst:state",
                                                                 "~gantry:inst:reason"]
    assert "+hgetall" in rules and "+@read" not in rules and "+@write" not in rules and "-@dangerous" in rules


def test_only_the_reconciler_writes_and_workers_get_no_redis_user() -> None:
    assert "+@write" in (redis_rules("reconciler") or "")
    assert redis_rules("workers") is None and redis_rules("worker-w0") is None and redis_rules("engine_server") is None


def test_redis_default_user_is_off_and_protected_mode_on() -> None:
    acl = redis_acl(Credentials.generate())
    assert "protected-mode yes" in acl and "user default off resetpass" in acl


def test_nats_configuration_has_no_anonymous_user() -> None:
    text = nats_authorization(Credentials.generate(workers=["w0"]))
    assert "no_auth_user" not in text and '"worker-w0"' in text


def test_the_documented_table_is_the_shipped_one() -> None:
    doc = (REPO_ROOT / "docs" / "security.md").read_text()
    start, end = "<!-- permission-table:start -->\n", "\n<!-- permission-table:end -->"
    assert doc[doc.index(start) + len(start):doc.index(end)].strip() == permission_table().strip()


def test_credentials_are_private_and_generated_once(tmp_path: Path) -> None:
    first = Credentials.ensure(tmp_path)
    path = tmp_path / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert Credentials.ensure(tmp_path).secrets == first.secrets
    assert set(ROLES) <= set(first.secrets)
    assert len(bytes.fromhex(first.report_key)) == 32
    assert Credentials.ensure(tmp_path).report_key == first.report_key


def test_a_home_made_before_reports_were_signed_gets_a_report_key_and_keeps_its_secrets(tmp_path: Path) -> None:
    old = Credentials.generate()
    old.report_key = ""
    old.save(tmp_path / "credentials.json")
    creds = Credentials.ensure(tmp_path)
    assert creds.secrets == old.secrets and creds.report_key
    assert json.loads((tmp_path / "credentials.json").read_text())["engine_report_key"] == creds.report_key


@pytest.mark.parametrize("text", ["", "{", "[]", '{"identities": {"a": 1}}', '{"other": {}}'])
def test_a_malformed_credentials_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "credentials.json").write_text(text)
    with pytest.raises(AuthError, match="cannot read credentials"):
        Credentials.load(tmp_path / "credentials.json")


def test_a_bad_worker_name_gets_no_identity() -> None:
    with pytest.raises(AuthError):
        Credentials().add_worker("w0.>")


def test_settings_take_the_identitys_secret_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"identities": {"cli": "s3cret"}}))
    settings = Settings(identity="cli", credentials_file=str(path))
    assert settings.nats_url == "nats://cli:s3cret@127.0.0.1:4222"
    assert settings.redis_url == "redis://cli:s3cret@127.0.0.1:6379/0"
    explicit = Settings(identity="cli", credentials_file=str(path), nats_url="nats://me:mine@h:1")
    assert explicit.nats_url == "nats://me:mine@h:1"  # a user in the URL wins


def test_each_child_runs_as_the_service_it_runs() -> None:
    for name, argv in SERVICE_COMMANDS.items():
        assert identity_of(argv) == name
    assert identity_of(WORKERS_COMMAND) == "workers"
    assert identity_of(["python", "-m", "services.engine_server"]) == "engine_server"
    assert identity_of(["python", "script.py"]) is None


def test_a_report_naming_another_worker_is_impersonation() -> None:
    assert impersonation("w0", "w0") is None
    assert "impersonation refused" in (impersonation("w0", "w1") or "")


def _worker(*vram_gib: int, ram: int = 1 << 40) -> Worker:
    return Worker(name="w0", gpus=tuple(Gpu(index=i, vram_total=v * GIB) for i, v in enumerate(vram_gib)),
                  ram_total=ram)


@pytest.mark.parametrize(
    ("old", "new", "claimed", "ram", "fragment"),
    [
        (None, _worker(240), {0: 70 * GIB}, 0, None),  # a new worker registers freely
        (_worker(80), _worker(80), {0: 70 * GIB}, 0, None),  # the same inventory again
        (_worker(80, 80), _worker(80, 240), {0: 70 * GIB}, 0, None),  # a GPU without claims may change
        (_worker(80, 80), _worker(80), {0: 70 * GIB, 1: 0}, 0, None),  # ... or leave
        (_worker(80), _worker(240), {0: 70 * GIB}, 0, "VRAM changed"),
        (_worker(80), _worker(40), {0: 30 * GIB}, 0, "VRAM changed"),
        (_worker(80, 80), _worker(80), {1: 10 * GIB}, 0, "left the inventory"),
        (_worker(80, ram=1 << 40), _worker(80, ram=1 << 30), {0: GIB}, 2 << 30, "RAM shrank"),
        # RAM above what is claimed may shrink: a forged registration that raised it is repaired by the next real one
        (_worker(80, ram=1 << 42), _worker(80, ram=1 << 40), {0: GIB}, 2 << 30, None),
    ],
)
def test_an_inventory_change_under_claims_is_refused(
    old: Worker | None, new: Worker, claimed: dict[int, int], ram: int, fragment: str | None
) -> None:
    reason = check_inventory_change(old, new, claimed, ram)
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None and fragment in reason and "holds claims" in reason


def test_a_child_runs_as_its_identity_whatever_the_extra_environment(tmp_path: Path) -> None:
    from ops.stack import LocalStack

    stack = LocalStack(Settings(), home=tmp_path, credentials=Credentials.generate(),
                       extra_env={"GANTRY_NATS_URL": "nats://admin:x@127.0.0.1:4222", "GANTRY_FORGET_AFTER_S": "6"})
    env = stack.child_env("filter")
    assert env["GANTRY_NATS_URL"].startswith("nats://filter:") and env["GANTRY_REDIS_URL"].startswith("redis://filter:")
    assert env["GANTRY_IDENTITY"] == "filter" and env["GANTRY_FORGET_AFTER_S"] == "6"


def test_the_picker_answers_requests_but_publishes_nothing_else_than_dead_letters_snapshot_requests_and_outcomes(
) -> None:
    perms = permissions("picker")
    assert perms.responds
    assert {p for p in perms.publish if p.startswith(subjects.PREFIX + ".")} == {
        subjects.dead_letter("picker"), subjects.ENGINE_KV_SNAPSHOT_ALL, subjects.PICKER_OUTCOMES}
    assert covered(subjects.PICK, perms.subscribe) and covered(subjects.engine_kv_events("m-1"), perms.subscribe)
    assert not covered(subjects.SCALE, perms.publish)
    conf = nats_authorization(Credentials.generate())
    picker_block = conf[conf.index('user: "picker"'):]
    picker_block = picker_block[:picker_block.index("}}")]
    assert "allow_responses: true" in picker_block
    assert conf.count("allow_responses") == 2  # the picker's and the engines' (snapshot answers)


def test_only_the_state_writer_may_ask_the_workers_to_register_again() -> None:
    # one sync request makes every worker register: the reconciler (which stores registrations) alone may send it
    askers = {r for r in (*ROLES, "worker-w7") if r != ADMIN and covered(subjects.SYNC, permissions(r).publish)}
    assert askers == {"reconciler"}
    assert covered(subjects.SYNC, permissions("workers").subscribe)
    assert covered(subjects.SYNC, permissions("worker-w7").subscribe)


def test_only_the_pickers_ask_for_engine_cache_snapshots_and_only_the_engines_answer_them() -> None:
    snapshot = subjects.engine_kv_snapshot("m-1")
    askers = {r for r in ROLES if r != ADMIN and covered(snapshot, permissions(r).publish)}
    answerers = {r for r in ROLES if r != ADMIN and covered(snapshot, permissions(r).subscribe)
                 and permissions(r).responds}  # the CLI reads every subject but may answer none
    assert askers == {"picker", "gateway"}
    assert answerers == {"engine_server"}
    assert not covered(subjects.engine_kv_events("m-1"), permissions("gateway").publish)
    engine_block = nats_authorization(Credentials.generate())
    engine_block = engine_block[engine_block.index('user: "engine_server"'):]
    assert "allow_responses: true" in engine_block[:engine_block.index("}}")]


SERVICES = ("filter", "fitting", "scoring", "reconciler")


@pytest.mark.parametrize("identity", [r for r in ROLES if r != ADMIN] + ["worker-w7"])
@pytest.mark.parametrize("stream", streams.ALL_STREAMS)
def test_no_identity_but_the_admin_may_create_or_reconfigure_a_stream(identity: str, stream: str) -> None:
    publish = permissions(identity).publish
    assert not covered(f"$JS.API.STREAM.CREATE.{stream}", publish)
    assert not covered(f"$JS.API.STREAM.UPDATE.{stream}", publish)


@pytest.mark.parametrize("identity", SERVICES)
def test_a_service_may_read_its_own_durable_consumers_and_create_none(identity: str) -> None:
    publish = permissions(identity).publish
    own = {(c.stream, c.durable) for c in role_contracts()[identity].consumes if c.stream}
    assert own
    for stream, durable, _ in streams.ALL_CONSUMERS:
        assert covered(f"$JS.API.CONSUMER.INFO.{stream}.{durable}", publish) == ((stream, durable) in own)
        assert covered(f"$JS.API.STREAM.INFO.{stream}", publish) or (stream, durable) not in own
        for create in (f"CONSUMER.CREATE.{stream}.{durable}", f"CONSUMER.CREATE.{stream}.{durable}.x",
                       f"CONSUMER.DURABLE.CREATE.{stream}.{durable}"):
            assert not covered(f"$JS.API.{create}", publish)


def test_the_admin_may_provision_every_stream_and_durable_consumer() -> None:
    publish = permissions(ADMIN).publish
    for stream in streams.ALL_STREAMS:
        assert covered(f"$JS.API.STREAM.CREATE.{stream}", publish)
        assert covered(f"$JS.API.STREAM.UPDATE.{stream}", publish)
    for stream, durable, _ in streams.ALL_CONSUMERS:
        assert covered(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}", publish)
