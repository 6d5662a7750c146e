"""Connection and timing settings shared by every service, the CLI and the local stack.

Read from the environment (prefix ``GANTRY_``) so that ``gantry up``, docker-compose and the test
fixtures configure processes the same way.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of one Gantry process; every field maps to ``GANTRY_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="GANTRY_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL (JetStream enabled)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL, password included if any")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="seconds between worker heartbeats")
    not_ready_after_s: float = Field(15.0, gt=0, description="heartbeat age that makes a worker NOT_READY")
    reschedule_after_s: float = Field(30.0, gt=0, description="NOT_READY time after which instances move")
    drain_timeout_s: float = Field(30.0, ge=0, description="longest a DRAINING instance waits to go idle")
    profile: str = Field("default", description="placement profile name (enabled plugins and weights)")
    # bus (JetStream) behaviour
    ack_wait_s: float = Field(10.0, gt=0, description="JetStream ack wait before redelivery")
    max_deliver: int = Field(6, ge=1, description="JetStream deliveries before a message is given up")
    js_storage: str = Field("file", description="JetStream storage for Gantry streams: file | memory")
    # placement commits
    commit_retries: int = Field(5, ge=0, description="re-placements after refused commits before PENDING")
    commit_backoff_s: float = Field(0.02, ge=0, description="base backoff between refused-commit retries")
    batch_max: int = Field(64, ge=1, description="largest placement batch a service handles at once")
    command_linger_s: float = Field(
        0.01, ge=0, description="under load, the reconciler gathers scale commands this long into one batch"
    )
    status_linger_s: float = Field(
        0.05, ge=0, description="reconciler waits this long for more worker status reports after a partial batch"
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
    fit_cache_s: float = Field(
        0.2, ge=0, description="fitting reuses a model's candidates this long (scoring re-checks them); 0: off"
    )


def load_settings() -> Settings:
    """Settings from the current environment."""
    return Settings()
