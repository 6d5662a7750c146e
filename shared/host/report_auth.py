"""Engine reports authenticated per instance (docs/security.md, "Engine reports").

Every engine server publishes on NATS as the one engine identity, so the bus alone cannot tell which server
sent a report: any of them could claim another instance's id. Each server therefore gets a key of its own,
derived from one master key and its instance id, and signs every report and KV-event message it publishes (a
NATS header ``<epoch>.<seq>.<hex HMAC-SHA256 of "<epoch>.<seq>." + payload>``). A picker holding the master key
derives the key of the instance a report claims and drops a report whose signature is missing or wrong.

The stamp makes a recorded message worthless later: ``epoch`` is when the publishing process started (unix ns,
a new one per restart) and ``seq`` counts its messages of one kind (load reports, KV events). Per instance and
kind, a picker takes only a stamp newer than the last it took: a later epoch (a restarted server, which counts
from 0 again), or the same epoch and a higher number; an epoch further ahead of its own clock than
``MAX_AHEAD_S`` (the skew it already allows a report's time) is refused, or one server's fast clock would lock
its instance's later restarts out. The payloads (and vLLM's KV-event schema) are unchanged; only the header is
added.

Pure apart from the logger and ``master_key_text`` (which reads the credentials file).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any

from shared.envsettings import credentials_path

log = logging.getLogger("gantry.picker")

SIGNATURE_HEADER = "Gantry-Report-Sig"
"""The NATS header carrying a report's stamped signature: ``<epoch>.<seq>.<hex HMAC-SHA256>`` (module doc)."""
REPORT_KEY_ENV = "GANTRY_ENGINE_REPORT_KEY"
"""An engine server's own key (hex), handed by its fleet through the environment, never its command line."""
MASTER_KEY_ENV = "GANTRY_ENGINE_REPORT_MASTER_KEY"
"""The master key (hex) of the fleet (to derive its servers' keys) and of the gateway (to check reports)."""
_LABEL = b"gantry-engine-report\0"  # domain separation: these keys sign engine reports and nothing else
MAX_CACHED_KEYS = 4096  # far above any pool (MAX_POOL_ENDPOINTS); forged ids cannot grow it without bound
LOG_EVERY_S = 10.0  # at most one log line per interval about dropped reports, however many arrive
MAX_AHEAD_S = 3.0
"""How far ahead of a picker's clock a new epoch may be: the skew it already allows a load report's time (the
feed's ``expire_s``, 3 s by default), so replay protection asks no closer clocks than routing did."""

METRICS, KV, SNAPSHOT = 0, 1, 2
"""The kinds of message, numbered apart: each has its own sequence (a load report, a KV message and a prefix-cache
snapshot answered on request are sent by different tasks, and a picker may apply them in either order)."""
KINDS = ("metrics", "kv", "snapshot")  # label of each kind (metrics, logs)


class Verdict(IntEnum):
    """What a picker makes of one message (``ReportVerifier.check``)."""

    ACCEPTED = 0
    RESTARTED = 1  # accepted, from a later process of an instance already heard: its cache starts empty
    UNSIGNED = 2  # no stamped signature (none, one from before stamps, or a header not shaped as one)
    FORGED = 3  # not signed with the key of the instance it claims (or altered)
    REPLAYED = 4  # genuine, but not newer than the last taken of its instance and kind: a replay, or reordered
    AHEAD = 5  # genuine, from an epoch further ahead of this picker's clock than MAX_AHEAD_S


# the verdicts as module constants: reading an enum's member off its class costs ~90 ns, a global ~10 ns, and the
# feed reads several per message
ACCEPTED, RESTARTED, UNSIGNED, FORGED, REPLAYED, AHEAD = Verdict

WHY = {Verdict.UNSIGNED: "no stamped signature", Verdict.FORGED: "not signed by the instance it claims",
       Verdict.REPLAYED: "a replay (stamp not newer than the last taken)",
       Verdict.AHEAD: f"started more than {MAX_AHEAD_S:g} s ahead of this picker's clock"}
"""Why each refusal, as the log and the dead letters say it."""
REFUSALS = tuple(WHY)
REASONS = {Verdict.UNSIGNED: "unsigned", Verdict.FORGED: "forged", Verdict.REPLAYED: "replayed",
           Verdict.AHEAD: "ahead"}
"""The metrics label of each refusal."""


_HEX_START = -64  # a signature ends with the 64 hex digits of the HMAC, after the stamp and its final dot
_STAMP_END = -65
_MIN_SIGNATURE = 68  # "e.s." and the HMAC


def keyed_sha256(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256's inner and outer hashes (RFC 2104) with ``key``'s padded blocks already hashed in."""
    block = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(bytes(b ^ 0x5C for b in block)))


def derive_key(master: bytes, instance_id: str) -> bytes:
    """The report key of ``instance_id``: HMAC-SHA256(master, label + instance id)."""
    return hmac.new(master, _LABEL + instance_id.encode(), hashlib.sha256).digest()


def sign(key: bytes, payload: bytes, epoch: int, seq: int) -> str:
    """The stamped signature of ``payload`` (the header's value): ``epoch.seq.`` and the hex HMAC of that
    prefix followed by the payload, with an instance's ``key``."""
    prefix = f"{epoch}.{seq}."
    return prefix + hmac.new(key, prefix.encode() + payload, hashlib.sha256).hexdigest()


class ReportSigner:
    """One engine server process's signatures: its instance's key, the epoch it started in, and the number of
    the next message of each kind (from 0)."""

    def __init__(self, key: bytes, epoch: int | None = None) -> None:
        self.key = key
        # unix ns when this process started signing: a restarted server's epoch is later, so its messages are
        # taken although it counts from 0 again, while the previous process's (replayed) ones are not
        self.epoch = time.time_ns() if epoch is None else epoch
        self._next = [0] * len(KINDS)

    def headers(self, kind: int, payload: bytes) -> dict[str, str]:
        """The headers to publish ``payload`` of ``kind`` (METRICS, KV, SNAPSHOT) with; each call takes the next number
        (a retried publish too: a picker that got both takes both, the KV numbering absorbs the repeat)."""
        seq = self._next[kind]
        self._next[kind] = seq + 1
        return {SIGNATURE_HEADER: sign(self.key, payload, self.epoch, seq)}


def signed_headers(signer: ReportSigner | None, kind: int, payload: bytes) -> dict[str, str] | None:
    """The headers to publish ``payload`` with: its stamped signature, or None without a key (unsigned)."""
    return signer.headers(kind, payload) if signer is not None else None


def parse_key(text: str, what: str) -> bytes:
    """A key given as hex text (an environment variable, the credentials file); ValueError names ``what``."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{what} is not hex") from None
    if len(key) < 16:
        raise ValueError(f"{what} is shorter than 16 bytes")
    return key


class ReportVerifier:
    """Checks that a report was signed with the key of the instance it claims (a picker given the master key)
    and is newer than the last one taken of that instance and kind (module doc).

    Keyed HMACs are cached per instance id (one hash of the payload per report, no key derivation); cleared when
    it reaches ``max_keys``, so a stream of forged ids costs CPU, not memory. The last stamp taken is kept per
    instance (only for genuine messages, so forged ids cannot grow it; past ``max_keys`` instances the one heard
    of first is forgotten). Refusals are counted per kind and reason (``refused``) and logged at most once per
    ``log_every_s``.
    """

    def __init__(self, master: bytes, max_keys: int = MAX_CACHED_KEYS, log_every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, max_ahead_s: float = MAX_AHEAD_S,
                 wall: Callable[[], float] = time.time) -> None:
        self._master = master
        # per instance id, HMAC-SHA256's inner and outer hashes with its derived key's padded blocks already hashed:
        # copies of them sign one payload, which skips deriving the key and hashing the key blocks, and costs less
        # than copying an ``hmac.HMAC`` (its Python wrapper): 2.1 -> 1.25 us per 0.5 KB report
        self._macs: dict[str, tuple[Any, Any]] = {}
        # per instance id: [epoch as signed (compared as text: no parsing per message), epoch, last seq of METRICS,
        # of KV, of SNAPSHOT] taken (-1: none yet in this epoch)
        self._last: dict[str, list[Any]] = {}
        self.max_keys = max_keys
        self.log_every_s = log_every_s
        self.max_ahead_s = max_ahead_s
        self._clock = clock
        self._wall = wall
        self._logged_at: float | None = None
        self._unlogged = 0
        self.dropped = 0  # messages refused, all kinds and reasons (operators, tests)
        self.refused: dict[tuple[int, Verdict], int] = {(k, v): 0 for k in range(len(KINDS)) for v in REFUSALS}

    def _mac(self, instance_id: str) -> tuple[Any, Any]:
        mac = self._macs.get(instance_id)
        if mac is None:
            if len(self._macs) >= self.max_keys:
                self._macs.clear()
            mac = self._macs[instance_id] = keyed_sha256(derive_key(self._master, instance_id))
        return mac

    def cached(self) -> int:
        """How many instance ids have a cached key."""
        return len(self._macs)

    def stamped(self) -> int:
        """How many instances' last stamps are remembered."""
        return len(self._last)

    def check(self, instance_id: str, payload: bytes, headers: Mapping[str, str] | None, kind: int) -> Verdict:
        """The verdict on one message of ``kind`` claiming ``instance_id``; an accepted one's stamp becomes the
        last taken (no counting, no log)."""
        value = headers.get(SIGNATURE_HEADER) if headers else None
        # (non-ASCII text would make ``compare_digest`` raise TypeError; ``isascii`` reads a flag of the str)
        if value is None or len(value) < _MIN_SIGNATURE or value[_STAMP_END] != "." or not value.isascii():
            return UNSIGNED
        inner, outer = self._mac(instance_id)
        inner, outer = inner.copy(), outer.copy()
        inner.update(value[:_HEX_START].encode() + payload)  # the signed stamp "epoch.seq." and the payload
        outer.update(inner.digest())
        if not hmac.compare_digest(value[_HEX_START:], outer.hexdigest()):
            return FORGED
        epoch_text, _, seq_text = value[:_STAMP_END].partition(".")
        last = self._last.get(instance_id)
        try:  # signed, so written by the key's holder: a stamp that is no number is still not one to trust
            seq = int(seq_text)
            if last is not None and epoch_text == last[0]:  # the usual case: the same process's next message
                if seq <= last[2 + kind]:
                    return REPLAYED
                last[2 + kind] = seq
                return ACCEPTED
            epoch = int(epoch_text)
        except ValueError:
            return FORGED
        if last is not None and epoch <= last[1]:
            return REPLAYED  # a process older than the one heard last
        if epoch > (self._wall() + self.max_ahead_s) * 1e9:
            return AHEAD
        fresh: list[Any] = [epoch_text, epoch, *(-1 for _ in KINDS)]
        fresh[2 + kind] = seq
        if last is None and len(self._last) >= self.max_keys:
            del self._last[next(iter(self._last))]  # the instance heard of first (ids are not reused)
        self._last[instance_id] = fresh
        return ACCEPTED if last is None else RESTARTED

    def admit(self, instance_id: str, payload: bytes, headers: Mapping[str, str] | None, subject: str,
              kind: int) -> Verdict:
        """``check``, with a refusal counted and logged (bounded rate)."""
        verdict = self.check(instance_id, payload, headers, kind)
        if verdict <= RESTARTED:
            return verdict
        self.dropped += 1
        self.refused[kind, verdict] += 1
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self.log_every_s:
            log.warning("engine report on %s claiming instance %s dropped: %s (%d dropped since the last such "
                        "line, %d in all)", subject, instance_id, WHY[verdict], self._unlogged, self.dropped)
            self._logged_at, self._unlogged = now, 0
        return verdict


REPORT_MASTER_KEY_FIELD = "engine_report_key"
"""The credentials file's entry holding the engines' report master key (hex; beside ``identities``)."""


def master_key_text(environ: Mapping[str, str], credentials_file: str) -> str | None:
    """The engines' report master key as hex text: ``$GANTRY_ENGINE_REPORT_MASTER_KEY`` (how `gantry up` hands it
    to the fleet and the gateway), else the entry of the credentials file when one is named (compose mounts one in
    every Gantry container); None when neither holds one (reports then go unsigned / unchecked)."""
    if environ.get(MASTER_KEY_ENV):
        return environ[MASTER_KEY_ENV]
    if not credentials_file:
        return None
    try:
        found = json.loads(credentials_path(credentials_file).read_text()).get(REPORT_MASTER_KEY_FIELD)
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and found else None
