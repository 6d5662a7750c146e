"""Engine reports authenticated per instance (docs/security.md, "Engine reports").

Every engine server publishes on NATS as the one engine identity, so the bus alone cannot tell which server
sent a report: any of them could claim another instance's id. Each server therefore gets a key of its own,
derived from one master key and its instance id, and signs every report and KV-event message it publishes (a
NATS header holding the hex HMAC-SHA256 of the payload). A picker holding the master key derives the key of the
instance a report claims and drops a report whose signature is missing or wrong. The payloads (and vLLM's
KV-event schema) are unchanged; only the header is added.

Pure apart from the logger and ``master_key_text`` (which reads the credentials file).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping

from shared.envsettings import credentials_path

log = logging.getLogger("gantry.picker")

SIGNATURE_HEADER = "Gantry-Report-Sig"
"""The NATS header carrying a report's signature: hex HMAC-SHA256 of the payload with the instance's key."""
REPORT_KEY_ENV = "GANTRY_ENGINE_REPORT_KEY"
"""An engine server's own key (hex), handed by its fleet through the environment, never its command line."""
MASTER_KEY_ENV = "GANTRY_ENGINE_REPORT_MASTER_KEY"
"""The master key (hex) of the fleet (to derive its servers' keys) and of the gateway (to check reports)."""
_LABEL = b"gantry-engine-report\0"  # domain separation: these keys sign engine reports and nothing else
MAX_CACHED_KEYS = 4096  # far above any pool (MAX_POOL_ENDPOINTS); forged ids cannot grow it without bound
LOG_EVERY_S = 10.0  # at most one log line per interval about dropped reports, however many arrive


def derive_key(master: bytes, instance_id: str) -> bytes:
    """The report key of ``instance_id``: HMAC-SHA256(master, label + instance id)."""
    return hmac.new(master, _LABEL + instance_id.encode(), hashlib.sha256).digest()


def sign(key: bytes, payload: bytes) -> str:
    """The signature of ``payload`` with an instance's ``key`` (hex, the header's value)."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def signed_headers(key: bytes | None, payload: bytes) -> dict[str, str] | None:
    """The headers to publish ``payload`` with: its signature, or None without a key (unsigned, as before)."""
    return {SIGNATURE_HEADER: sign(key, payload)} if key is not None else None


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
    """Checks that a report was signed with the key of the instance it claims (a picker given the master key).

    Keyed HMACs are cached per instance id (one hash of the payload per report, no key derivation); cleared when
    it reaches ``max_keys``, so a stream of forged ids costs CPU, not memory. Drops are counted and logged at
    most once per ``log_every_s``.
    """

    def __init__(self, master: bytes, max_keys: int = MAX_CACHED_KEYS, log_every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._master = master
        # per instance id, an HMAC already keyed with its derived key: a copy of it signs one payload, which skips
        # deriving the key and hashing the padded key blocks (2.9 -> 1.8 us per 0.5 KB report)
        self._macs: dict[str, hmac.HMAC] = {}
        self.max_keys = max_keys
        self.log_every_s = log_every_s
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0
        self.dropped = 0  # reports dropped (operators, tests)

    def _mac(self, instance_id: str) -> hmac.HMAC:
        mac = self._macs.get(instance_id)
        if mac is None:
            if len(self._macs) >= self.max_keys:
                self._macs.clear()
            mac = self._macs[instance_id] = hmac.new(derive_key(self._master, instance_id), digestmod=hashlib.sha256)
        return mac

    def cached(self) -> int:
        """How many instance ids have a cached key."""
        return len(self._macs)

    def valid(self, instance_id: str, payload: bytes, headers: Mapping[str, str] | None) -> bool:
        """Whether ``payload`` carries a correct signature for ``instance_id`` (no counting, no log)."""
        got = headers.get(SIGNATURE_HEADER) if headers else None
        if got is None:
            return False
        mac = self._mac(instance_id).copy()
        mac.update(payload)
        return hmac.compare_digest(got, mac.hexdigest())

    def accepts(self, instance_id: str, payload: bytes, headers: Mapping[str, str] | None, subject: str) -> bool:
        """``valid``, and a report that is not counted as dropped and logged (bounded rate)."""
        if self.valid(instance_id, payload, headers):
            return True
        self.dropped += 1
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self.log_every_s:
            why = "no signature" if not headers or SIGNATURE_HEADER not in headers else "a wrong signature"
            log.warning("engine report on %s claiming instance %s dropped: %s (%d dropped since the last such "
                        "line, %d in all)", subject, instance_id, why, self._unlogged, self.dropped)
            self._logged_at, self._unlogged = now, 0
        return False


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
