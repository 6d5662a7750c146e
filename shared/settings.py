"""Connection and timing settings shared by every service, the CLI and the local stack.

Read from the environment (prefix ``GANTRY_``) so that ``gantry up``, docker-compose and the test
fixtures configure processes the same way. ``shared.envsettings`` reads the same fields without pydantic for
the CLI's read commands (a unit test holds the two declarations equal): a field added here goes there too.

Input limits are not settings: they are part of the message schema, declared once in
``shared/core/limits.py`` and enforced at every boundary. Their defaults, documented there and in
docs/operations.md ("Input limits"): names of 1-63 characters (DNS-label-like), at most 10,000 replicas per
model, 128 GPUs per worker, 4 TiB of VRAM per GPU, 256 TiB of RAM per worker, no negative claim, messages of
8 MiB, spec files of 1 MiB; a converge call creates at most 500 replicas, any other script call touches at
most 1,000 instances.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.envsettings import (
    CREDENTIALS_FILE,
    credentials_path,
    identity_secret,
    port_problem,
    redis_url_problem,
    with_user,
)

__all__ = ["CREDENTIALS_FILE", "Settings", "load_settings_or_exit", "setting_error"]


class Settings(BaseSettings):
    """Settings of one Gantry process; every field maps to ``GANTRY_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="GANTRY_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL (JetStream enabled)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL, password included if any")
    identity: str = Field(
        "", description="who this process is to NATS and Redis (ops.auth roles); with it, URLs without a user "
        "get the identity's secret from the credentials file"
    )
    tls_ca_file: str = Field(
        "", description="CA certificate (PEM) to trust for TLS to NATS (`gantry up --tls` writes .gantry/tls/ca.pem)"
    )
    credentials_file: str = Field(
        "", description="credentials written by `gantry up` (default: .gantry/credentials.json); a Docker secret"
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="seconds between worker heartbeats")
    not_ready_after_s: float = Field(15.0, gt=0, description="heartbeat age that makes a worker NOT_READY")
    reschedule_after_s: float = Field(30.0, gt=0, description="NOT_READY time after which instances move")
    drain_timeout_s: float = Field(30.0, ge=0, description="longest a DRAINING instance waits to go idle")
    profile: str = Field("default", description="placement profile name (enabled plugins and weights)")
    # bus (JetStream) behaviour
    ack_wait_s: float = Field(10.0, gt=0, description="JetStream ack wait before redelivery")
    max_deliver: int = Field(6, ge=1, description="JetStream deliveries before a message is given up")
    js_storage: str = Field("file", description="JetStream storage for Gantry streams: file | memory")
    pipe_max_bytes: int = Field(
        16 << 20, ge=1 << 10, le=1 << 36, description="bytes each of the placement pipeline's four streams (one per "
        "stage's input) holds before it refuses new messages (1 KiB to 64 GiB: past JetStream's 64-bit field a value "
        "failed only at provisioning)"
    )
    # placement commits
    commit_retries: int = Field(5, ge=0, description="re-placements after refused commits before PENDING")
    commit_backoff_s: float = Field(0.02, ge=0, description="base backoff between refused-commit retries")
    batch_max: int = Field(64, ge=1, description="largest placement batch a service handles at once")
    command_linger_s: float = Field(
        0.02, ge=0, description="while scale commands keep coming, the reconciler takes a batch of them at most "
        "this often (each batch costs one round of every pipeline stage); a lone command is never held back"
    )
    status_linger_s: float = Field(
        0.05, ge=0, description="while worker status reports keep coming, the reconciler takes a batch of them at "
        "most this often"
    )
    reconcile_interval_s: float = Field(1.0, gt=0, description="reconciler's liveness/drain check period")
    pending_retry_s: float = Field(
        1.0, gt=0, description="a PENDING replica is placed again this long after its verdict, doubling each time"
    )
    pending_retry_max_s: float = Field(
        8.0, gt=0, description="longest wait between two placements of a PENDING replica (the periodic flush)"
    )
    forget_after_s: float = Field(
        600.0, gt=0, description="a worker silent this long leaves the state (with its lost replicas)"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="port of the service's Prometheus /metrics endpoint; 0: not served"
    )
    metrics_host: str = Field(
        "0.0.0.0", description="address /metrics is served on (all interfaces: a container's port is published; "
        "`gantry up` serves it on 127.0.0.1)"
    )
    web_port: int = Field(
        8470, ge=0, le=65535, description="port of the web view `gantry up` serves on 127.0.0.1; 0: none"
    )
    fit_cache_s: float = Field(
        0.2, ge=0, description="fitting reuses a model's candidates this long (scoring re-checks them); 0: off"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_db_is_a_number(cls, url: str) -> str:
        if problem := redis_url_problem(url):
            raise ValueError(problem)
        return url

    @field_validator("nats_url", "redis_url")
    @classmethod
    def _port_is_a_port(cls, url: str) -> str:
        # here, not in _credentials below (which adds the secret to the URL and met the port first), so the error
        # names the setting: "invalid --redis-url: Port out of range 0-65535", not "invalid settings: ..."
        if problem := port_problem(url):
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _credentials(self) -> Settings:
        # URLs that name a user keep it (explicit wins); otherwise the identity's secret from the file.
        if not self.identity:
            return self
        secret = identity_secret(credentials_path(self.credentials_file), self.identity)
        if secret is not None:
            self.nats_url = with_user(self.nats_url, self.identity, secret)
            self.redis_url = with_user(self.redis_url, self.identity, secret)
        return self


def setting_error(err: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """The first invalid setting of ``err`` in one line, named as the environment spells it, or as ``flags``
    (field -> command-line flag) says it was given."""
    errors = err.errors()
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):  # pydantic's wording for a validator's own exception
        message = message.removeprefix(prefix)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    if not field:
        return f"invalid settings: {message}"
    given = (flags or {}).get(field)
    return f"invalid {given}: {message}" if given else f"invalid setting GANTRY_{field.upper()}: {message}"


def load_settings_or_exit(prog: str) -> Settings:
    """Settings from the current environment; an invalid value ends the process with one line that names it
    (exit status 2, as a command-line error), not a validation traceback."""
    try:
        return Settings()
    except ValidationError as err:
        print(f"{prog}: error: {setting_error(err)}", file=sys.stderr)
        raise SystemExit(2) from None
