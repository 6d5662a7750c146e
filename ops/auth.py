"""Identities, credentials and least-privilege permissions for NATS and Redis, derived from the contracts.

Every process speaks to the servers as one identity: an admin, the operator CLI, each placement service,
the emulated worker fleet, each real worker agent (``worker-<name>``) and the engine servers. Each identity's
NATS rights are computed here from what its contract declares it consumes and emits
(``shared.host.contract``), the JetStream streams and consumers of ``shared.bus.streams`` and the worker
subjects of ``shared.bus.subjects``: there is no second, hand-written list of subjects. Its Redis rights come
from its role: the reconciler (state writer, ledger) writes, the readers read, nobody but the admin flushes,
configures or debugs.

``gantry up`` generates the credentials once into ``.gantry/credentials.json`` (0600) and renders the server
configurations from them (``nats-auth.conf``, ``redis.conf``, both 0600); ``python -m ops.auth`` shows the
permission table, adds a worker identity and rotates secrets (docs/security.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ops.config import NATS_CONFIG
from shared.bus import streams, subjects
from shared.bus.exhausted import advisory_subject, get_subject
from shared.bus.runtime import inbox_prefix
from shared.core.limits import bad_worker_name
from shared.envsettings import ENGINE_IDENTITY, without_user
from shared.host.contract import Contract
from shared.host.report_auth import REPORT_MASTER_KEY_FIELD
from shared.paths import TlsFiles, tls_files
from shared.settings import CREDENTIALS_FILE, Settings
from shared.state.store import Keys

NATS_AUTH_FILE = "nats-auth.conf"
REDIS_CONF_FILE = "redis.conf"
ADMIN = "admin"
CLI = "cli"
FLEET = "workers"
ENGINE = ENGINE_IDENTITY
PICKER = "picker"
GATEWAY = "gateway"  # the endpoint picker behind Envoy (services.gateway)
WORKER_PREFIX = "worker-"
WRITERS = ("reconciler",)
READERS = ("filter", "fitting", "scoring", CLI)
GATEWAY_KEYS = (Keys.inst, Keys.inst_state, Keys.inst_reason)
"""The only keys the gateway's picker reads: the instances (``StateStore.instances``), at start, every
``resync_s`` and after a NATS reconnection."""
JS = "$JS.API"
ADMIN_ONLY_API = (
    f"{JS}.STREAM.PURGE.>", f"{JS}.STREAM.DELETE.>", f"{JS}.STREAM.MSG.DELETE.>", f"{JS}.CONSUMER.DELETE.>",
    f"{JS}.STREAM.SNAPSHOT.>", f"{JS}.STREAM.RESTORE.>", f"{JS}.STREAM.PEER.>", f"{JS}.STREAM.LEADER.>",
    f"{JS}.META.>", f"{JS}.SERVER.>", f"{JS}.ACCOUNT.>",
)
"""JetStream API subjects only the admin may use: purge, delete, snapshots, cluster and account management."""


class AuthError(RuntimeError):
    """Credentials cannot be read, written or used."""


@dataclass(frozen=True)
class Permissions:
    """What one identity may publish and subscribe to on NATS (allow lists; ``deny`` wins over allow)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()
    responds: bool = False  # may answer the requests it receives (NATS ``allow_responses``), whatever the inbox


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _stream_checks(contract: Contract) -> list[str]:
    # A hosted service checks at start that the streams it reads and its own durable consumers exist; the
    # launcher provisions them as the admin. No create or update: a service cannot reconfigure a stream or
    # another service's consumer.
    out = [f"{JS}.INFO"]
    for c in contract.consumes:
        if c.stream:
            out += [f"{JS}.STREAM.INFO.{c.stream}", f"{JS}.CONSUMER.INFO.{c.stream}.{c.durable}"]
    return out


def _settings() -> Settings:
    return Settings()


def inbox(identity: str) -> str:
    """The reply subjects ``identity`` may read: its own inboxes only (``shared.bus.runtime.inbox_prefix``)."""
    return inbox_prefix(identity) + ".>"


def contract_permissions(contract: Contract, checks_streams: bool = True, identity: str = "") -> Permissions:
    """NATS rights of a service: publish what it emits, subscribe to what it consumes on core NATS, pull
    and ack only its own durable consumers (``checks_streams``: and read their and their streams' info),
    receive replies on its own inboxes."""
    publish = [e.subject for e in contract.emits]
    subscribe = [c.subject for c in contract.consumes if not c.stream]
    for c in contract.consumes:
        if c.stream:
            publish += [f"{JS}.CONSUMER.MSG.NEXT.{c.stream}.{c.durable}", f"$JS.ACK.{c.stream}.{c.durable}.>",
                        get_subject(c.stream)]  # a message its consumer gave up on, read back to dead-letter it
            subscribe.append(advisory_subject(c.stream, c.durable))
    if checks_streams:
        publish += _stream_checks(contract)
    return Permissions(_unique(publish), _unique([*subscribe, inbox(identity or contract.service)]), ADMIN_ONLY_API)


def bind_worker(pattern: str, worker: str) -> str:
    """A worker-contract subject with its worker token (``*``) bound to ``worker``."""
    return ".".join(worker if token == "*" else token for token in pattern.split("."))


def worker_permissions(contract: Contract, worker: str) -> Permissions:
    """A real worker agent's rights: its own reports and commands only (``*`` bound to its name)."""
    own = inbox(WORKER_PREFIX + worker)
    base = contract_permissions(contract, checks_streams=False, identity=WORKER_PREFIX + worker)
    return Permissions(
        tuple(bind_worker(s, worker) for s in base.publish),
        tuple(s if s == own else bind_worker(s, worker) for s in base.subscribe),
        base.deny_publish,
    )


def cli_permissions() -> Permissions:
    """The operator CLI: durable commands, replays of events and dead letters (ephemeral consumers), reads of
    every Gantry subject; no purge or delete."""
    publish = [
        subjects.SCALE, subjects.CORDON, subjects.REMOVE_WORKER, f"{JS}.INFO",
        *(f"{JS}.STREAM.INFO.{name}" for name in streams.ALL_STREAMS),
        # ephemeral consumers only (the stream's bare create subject refuses a durable name): a durable one outlives
        # the CLI and the server's restarts, and a thousand of them refused every later replay
        *(f"{JS}.CONSUMER.CREATE.{name}" for name in (streams.STREAM_EVENTS, streams.STREAM_DLQ)),
        *(f"{JS}.CONSUMER.INFO.{name}.>" for name in streams.ALL_STREAMS),
        # Acks of its own replays only: an ack subject names its stream and consumer, and one of any other stream
        # would take a message away from the service consuming it (an ack is not checked against its sender).
        "$JS.FC.>", *(f"$JS.ACK.{name}.>" for name in (streams.STREAM_EVENTS, streams.STREAM_DLQ)),
    ]
    return Permissions(_unique(publish), (f"{subjects.PREFIX}.>", inbox(CLI)), ADMIN_ONLY_API)


def role_contracts() -> dict[str, Contract]:
    """Every service's declared contract by identity name (placement services as their host builds them)."""
    from ops.asyncapi import contracts

    return {c.service: c for c in contracts()}


def permissions(identity: str, contracts: dict[str, Contract] | None = None) -> Permissions:
    """The NATS rights of ``identity`` (see the module docstring)."""
    if identity == ADMIN:
        return Permissions((">",), (">",))
    if identity == CLI:
        return cli_permissions()
    contracts = contracts if contracts is not None else role_contracts()
    if identity.startswith(WORKER_PREFIX):
        return worker_permissions(contracts[FLEET], identity.removeprefix(WORKER_PREFIX))
    if identity == FLEET:  # the emulator: one process standing in for every worker it runs
        return contract_permissions(contracts[FLEET], checks_streams=False, identity=FLEET)
    if identity == ENGINE:  # its reports out; it answers the pickers' snapshot requests into their inboxes
        base = contract_permissions(contracts[ENGINE], checks_streams=False, identity=ENGINE)
        return Permissions(base.publish, base.subscribe, base.deny_publish, responds=True)
    if identity == GATEWAY:  # engine reports and instance events in, its dead letters out; no stream API
        return contract_permissions(contracts[GATEWAY], checks_streams=False, identity=GATEWAY)
    if identity == PICKER:  # a request/reply service: it answers into its requesters' inboxes, nothing else
        base = contract_permissions(contracts[PICKER], checks_streams=False, identity=PICKER)
        return Permissions(base.publish, base.subscribe, base.deny_publish, responds=True)
    if identity in contracts:
        return contract_permissions(contracts[identity])
    raise AuthError(f"no identity named {identity!r}")


def redis_rules(identity: str) -> str | None:
    """The Redis ACL rules of ``identity`` (after ``on >password``), or None when it gets no Redis user."""
    base = "~gantry:* resetchannels -@all +@connection"
    safe = "-@dangerous +ping +select +auth +hello +echo"
    if identity == ADMIN:
        return "~* &* +@all"
    if identity in WRITERS:  # state writer and ledger: reads, writes and the ledger's Lua scripts
        return f"{base} +@read +@write +@transaction {safe} +eval +evalsha +script|load +script|exists"
    if identity in READERS:
        return f"{base} +@read {safe}"
    if identity in (GATEWAY, PICKER):  # the instances' three hashes (pool from placement), nothing else
        keys = " ".join(f"~{k}" for k in GATEWAY_KEYS)
        # the hash reads by name: +@read also grants the keyless SCAN, RANDOMKEY and DBSIZE, which list every key
        # name of the store whatever the key patterns
        return f"{keys} resetchannels -@all +@connection +hgetall +hget +hmget {safe}"
    return None


PLACEMENT_ROLES = ("filter", "fitting", "scoring", "reconciler")
ROLES = (ADMIN, CLI, *PLACEMENT_ROLES, FLEET, ENGINE, PICKER, GATEWAY)


def new_report_key() -> str:
    """A fresh engine report master key (hex, 32 random bytes)."""
    return secrets.token_hex(32)


@dataclass
class Credentials:
    """A secret per identity (used for both servers), and the engines' report master key (hex: each engine
    server signs its reports with a key derived from it for its instance, ``shared.host.report_auth``), kept in
    one 0600 file."""

    secrets: dict[str, str] = field(default_factory=dict)
    report_key: str = ""

    @classmethod
    def generate(cls, workers: Sequence[str] = ()) -> Credentials:
        """Fresh secrets for every role and for ``workers``' agents."""
        creds = cls(report_key=new_report_key())
        for name in ROLES:
            creds.secrets[name] = secrets.token_urlsafe(24)
        for worker in workers:
            creds.add_worker(worker)
        return creds

    def add_worker(self, worker: str) -> str:
        """Give worker agent ``worker`` its own identity (``worker-<name>``); returns the identity."""
        reason = bad_worker_name(worker)
        if reason:
            raise AuthError(reason)
        identity = WORKER_PREFIX + worker
        self.secrets.setdefault(identity, secrets.token_urlsafe(24))
        return identity

    def rotate(self, identity: str | None = None) -> None:
        """New secrets for ``identity`` (or every identity, and a new report master key)."""
        if identity is None:
            self.report_key = new_report_key()
        for name in [identity] if identity else list(self.secrets):
            if name not in self.secrets:
                raise AuthError(f"no identity named {name!r}")
            self.secrets[name] = secrets.token_urlsafe(24)

    def password(self, identity: str) -> str:
        """The secret of ``identity``."""
        try:
            return self.secrets[identity]
        except KeyError:
            raise AuthError(f"no credentials for identity {identity!r}") from None

    def url(self, url: str, identity: str) -> str:
        """``url`` (NATS or Redis) with ``identity``'s user and secret in place of any it carried."""
        return with_userinfo(url, identity, self.password(identity))

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only."""
        write_private(path, self.document())

    def document(self) -> str:
        """The file's text."""
        doc: dict[str, object] = {"identities": self.secrets}
        if self.report_key:
            doc[REPORT_MASTER_KEY_FIELD] = self.report_key
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a credentials file (AuthError with the reason when it is unreadable or malformed)."""
        try:
            data = json.loads(path.read_text())
            found = data["identities"]
            if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
                raise ValueError("identities must map names to secrets")
            report_key = data.get(REPORT_MASTER_KEY_FIELD, "")
            if not isinstance(report_key, str):
                raise ValueError(f"{REPORT_MASTER_KEY_FIELD} must be hex text")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AuthError(f"cannot read credentials {path}: {err}") from None
        return cls(dict(found), report_key)

    @classmethod
    def ensure(cls, home: Path) -> Credentials:
        """The credentials of a stack home, generated on first use; any role missing (or the report master key,
        in a home made before there was one) is added."""
        path = home / CREDENTIALS_FILE
        creds = cls.load(path) if path.exists() else cls()
        missing = [name for name in ROLES if name not in creds.secrets]
        for name in missing:
            creds.secrets[name] = secrets.token_urlsafe(24)
        if not creds.report_key:
            creds.report_key = new_report_key()
            missing.append(REPORT_MASTER_KEY_FIELD)
        if missing:
            creds.save(path)
        return creds


def with_userinfo(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` as its userinfo (replacing any)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def without_userinfo(url: str) -> str:
    """``url`` without user or secret (for state files and logs)."""
    return without_user(url)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    # (never through a link someone put at the temporary name; on disk before it takes the file's place: a crash
    # must not leave an empty credentials file behind)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _quote(value: str) -> str:
    return json.dumps(value)


def nats_authorization(creds: Credentials, contracts: dict[str, Contract] | None = None) -> str:
    """The ``authorization`` block of nats-server's configuration: one user per identity, with its rights.
    There is no ``no_auth_user``: a client without credentials is refused."""
    contracts = contracts if contracts is not None else role_contracts()
    users = []
    for identity in sorted(creds.secrets):
        perms = permissions(identity, contracts)
        publish = f"allow: [{', '.join(map(_quote, perms.publish))}]"
        if perms.deny_publish:
            publish += f", deny: [{', '.join(map(_quote, perms.deny_publish))}]"
        responses = "      allow_responses: true\n" if perms.responds else ""
        users.append(
            f"    {{user: {_quote(identity)}, password: {_quote(creds.password(identity))}, permissions: {{\n"
            f"      publish: {{{publish}}}\n"
            f"      subscribe: {{allow: [{', '.join(map(_quote, perms.subscribe))}]}}\n"
            f"{responses}"
            f"    }}}}"
        )
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def nats_config(base: str, creds: Credentials, tls: TlsFiles | None = None) -> str:
    """The repository's NATS configuration with authorization (and TLS when given)."""
    text = base.rstrip() + "\n\n" + nats_authorization(creds)
    if tls is not None:
        text += (
            f"tls {{\n  cert_file: {_quote(str(tls.cert))}\n  key_file: {_quote(str(tls.key))}\n"
            f"  ca_file: {_quote(str(tls.ca))}\n  timeout: 5\n}}\n"
        )
    return text


def redis_acl(creds: Credentials) -> str:
    """Redis configuration lines: protected mode, the default user off, one ACL user per identity with rights."""
    lines = ["protected-mode yes", "user default off resetpass resetkeys -@all"]
    for identity in sorted(creds.secrets):
        rules = redis_rules(identity)
        if rules is not None:
            lines.append(f"user {identity} on >{creds.password(identity)} {rules}")
    return "\n".join(lines) + "\n"


def redis_config(creds: Credentials, tls: TlsFiles | None = None) -> str:
    """The Redis configuration file the stack starts redis-server with."""
    text = redis_acl(creds)
    if tls is not None:
        text += f"tls-cert-file {tls.cert}\ntls-key-file {tls.key}\ntls-ca-cert-file {tls.ca}\ntls-auth-clients no\n"
    return text


@dataclass(frozen=True)
class ServerConfigs:
    """The rendered server configurations of a stack home."""

    nats: Path
    redis: Path


NATS_DIR = "nats"  # a stack home's NATS data and configuration (``LocalStack``)
REDIS_DIR = "redis"


def write_server_configs(creds: Credentials, home: Path) -> ServerConfigs:
    """Render both servers' configurations where a stack home's servers read them (0600: they hold the secrets), so
    ``nats-server --signal reload`` applies new users and revokes old ones at once; Redis reads its users when it
    starts. NATS keeps its TLS block when the configuration it runs with has one."""
    nats_path, redis_path = home / NATS_DIR / NATS_AUTH_FILE, home / REDIS_DIR / REDIS_CONF_FILE
    tls = None
    with contextlib.suppress(OSError):
        if "\ntls {" in nats_path.read_text():
            tls = tls_files(home)
    nats_path.parent.mkdir(parents=True, exist_ok=True)
    redis_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(nats_path, nats_config(NATS_CONFIG.read_text(), creds, tls))
    write_private(redis_path, redis_config(creds))
    return ServerConfigs(nats_path, redis_path)


COMPOSE_FILES = ("credentials.json", "nats.conf", "redis.conf")
"""What ``python -m ops.auth compose`` writes for docker-compose's servers and services (one volume)."""


def write_compose_secrets(out: Path) -> bool:
    """Credentials and both servers' configurations for docker-compose, generated on first run into ``out`` (a
    volume only Gantry's containers mount). Readable by every user of those containers (the services run as
    ``nobody``, Redis as ``redis``). Returns False when they existed already (kept: idempotent)."""
    path = out / COMPOSE_FILES[0]
    if path.exists():
        creds = Credentials.load(path)  # still readable, or AuthError
        if not creds.report_key:  # a volume made before reports were signed: the key is added, nothing else changes
            creds.report_key = new_report_key()
            write_private(path, creds.document())
            os.chmod(path, 0o644)
        return False
    creds = Credentials.generate()
    texts = (
        creds.document(),
        nats_config(NATS_CONFIG.read_text(), creds),
        redis_config(creds),
    )
    for name, text in reversed(list(zip(COMPOSE_FILES, texts, strict=True))):  # credentials last: the marker
        write_private(out / name, text)
        os.chmod(out / name, 0o644)
    return True


def permission_table(contracts: dict[str, Contract] | None = None) -> str:
    """The shipped rights of every role as a Markdown table (docs/security.md embeds it)."""
    contracts = contracts if contracts is not None else role_contracts()
    rows = ["| identity | NATS publish | NATS subscribe | Redis |", "|---|---|---|---|"]
    example = WORKER_PREFIX + "<name>"
    for identity in (*ROLES, example):
        perms = permissions(WORKER_PREFIX + "NAME" if identity == example else identity, contracts)
        publish = [p.replace("NAME", "<name>") for p in perms.publish if not p.startswith(f"{JS}.") or "NEXT" in p]
        api = sorted({p.split(".")[2] + "." + p.split(".")[3] for p in perms.publish
                      if p.startswith(f"{JS}.") and p.count(".") >= 3 and "NEXT" not in p})
        if api:
            publish.append("JetStream API: " + ", ".join(api))
        if perms.deny_publish:
            publish.append("denied: purge, delete, snapshot/restore, cluster and account API")
        sub = [s.replace("NAME", "<name>") for s in perms.subscribe]
        redis = redis_rules(identity if identity != example else "none") or "no user"
        rows.append(f"| `{identity}` | {'<br>'.join(f'`{p}`' for p in publish)} | "
                    f"{'<br>'.join(f'`{s}`' for s in sub)} | `{redis}` |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``table`` prints the permission table; ``add-worker NAME`` gives a worker agent its identity;
    ``rotate [IDENTITY]`` renews secrets (restart the stack afterwards)."""
    from shared.paths import runtime_dir

    parser = argparse.ArgumentParser(prog="python -m ops.auth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("table")
    add = sub.add_parser("add-worker")
    add.add_argument("name")
    rot = sub.add_parser("rotate")
    rot.add_argument("identity", nargs="?")
    comp = sub.add_parser("compose")
    comp.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(permission_table(), end="")
        return 0
    if args.cmd == "compose":
        try:
            made = write_compose_secrets(args.out)
        except AuthError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"credentials {'generated' if made else 'kept'} in {args.out}")
        return 0
    home = runtime_dir()
    try:
        creds = Credentials.ensure(home)
        if args.cmd == "add-worker":
            identity = creds.add_worker(args.name)
            print(f"identity {identity}: give the agent GANTRY_NATS_URL with user {identity} "
                  f"and the secret from {home / CREDENTIALS_FILE}")
        else:
            creds.rotate(args.identity)
            print("secrets renewed: restart the stack (`gantry down`, `gantry up`) to apply them everywhere")
        creds.save(home / CREDENTIALS_FILE)
        write_server_configs(creds, home)
    except AuthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
