"""Prometheus metrics of a placement service, declared once for every service the host runs.

The host counts what every service does alike (messages handled per subject, batch sizes, the consumer's
backlog, dead letters) and observes the placement-latency SLI at its stage of the pipeline; the reconciler
adds what only it knows (commits refused by the GPU ledger, PENDING replicas) and observes the SLI proper at
the commit. Exposed on ``GANTRY_METRICS_PORT`` (0: off) by ``prometheus-client``'s HTTP server, from a
registry of the service's own (several services may live in one test process).

The SLI follows kube-scheduler's ``scheduler_pod_scheduling_sli_duration_seconds``: seconds from the scale
event that asked for a replica (``PlacementItem.requested_at``, the command's JetStream timestamp) to the
stage named by the ``stage`` label; ``stage="committed"`` (reconciler) is the end-to-end figure, the other
stages (``filtered``, ``fitted``, ``scored``) say where the time went. A replica placed again after a
refused commit or a PENDING verdict counts from that new request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from shared.bus.messages import PlacementFiltered, PlacementFitted, PlacementRequest, PlacementScored

log = logging.getLogger("gantry.metrics")

# Seconds, like kube-scheduler's SLI buckets: 5 ms doubling to ~80 s.
SLI_BUCKETS = tuple(0.005 * 2**k for k in range(15))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

SLI = "gantry_placement_sli_duration_seconds"
HANDLED = "gantry_messages_handled_total"
BATCH = "gantry_batch_size"
BACKLOG = "gantry_consumer_pending_messages"
DEAD_LETTERS = "gantry_dead_letters_total"
REFUSALS = "gantry_commit_refusals_total"
COMMITTED = "gantry_placements_committed_total"
PENDING = "gantry_pending_replicas"
INVALID_WORKERS = "gantry_invalid_stored_workers"

STAGES = {"filter": "filtered", "fitting": "fitted", "scoring": "scored", "reconciler": "committed"}
"""The SLI stage each service observes (the reconciler's is the commit: the SLI proper)."""


class ServiceMetrics:
    """One service replica's metrics, in a registry of its own; every series carries ``service``."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sli = Histogram(
            SLI, "Seconds from the scale event asking for a replica to the stage (committed: the placement SLI)",
            ["service", "stage"], buckets=SLI_BUCKETS, registry=r,
        )
        self.handled = Counter(HANDLED, "Messages a service handled, per subject", ["service", "subject"], registry=r)
        self.batch = Histogram(
            BATCH, "Messages per pulled batch, per subject", ["service", "subject"], buckets=BATCH_BUCKETS, registry=r
        )
        self.backlog = Gauge(
            BACKLOG, "Messages still waiting in the service's JetStream consumer after its last pulled batch",
            ["service", "consumer"], registry=r,
        )
        self.dead_letters = Counter(
            DEAD_LETTERS, "Messages the service rejected (dead-lettered), per subject", ["service", "subject"],
            registry=r,
        )
        self.refusals = Counter(
            REFUSALS, "Placement commits the GPU ledger refused (claims taken in flight, stale candidates)",
            ["service", "outcome"], registry=r,
        )
        self.committed = Counter(COMMITTED, "Replicas committed to a worker", ["service"], registry=r)
        self.pending = Gauge(PENDING, "Replicas in PENDING (not placed), at the reconciler's last tick",
                             ["service"], registry=r)
        self.invalid_workers = Gauge(
            INVALID_WORKERS, "Stored worker records that break today's limits (left out of every snapshot), at the "
            "reconciler's last full check", ["service"], registry=r,
        )
        self._server: MetricsServer | None = None
        # The labelled series of the per-batch observations, looked up once: ``labels()`` validates, locks and
        # hashes its arguments on every call, and every pulled batch made four such calls.
        self._pulled: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._stages: dict[str, Any] = {}

    # -- observations -----------------------------------------------------------------------------

    def batch_pulled(self, consumer: str, subject: str, size: int, backlog: int | None) -> None:
        """A pulled batch of ``size`` messages, and what its consumer still holds."""
        series = self._pulled.get((consumer, subject))
        if series is None:
            series = self._pulled[(consumer, subject)] = (
                self.handled.labels(self.service, subject), self.batch.labels(self.service, subject),
                self.backlog.labels(self.service, consumer),
            )
        handled, batch, pending = series
        handled.inc(size)
        batch.observe(size)
        if backlog is not None:
            pending.set(backlog)

    def dead_letter(self, subject: str) -> None:
        """A message rejected on ``subject``."""
        self.dead_letters.labels(self.service, subject).inc()

    def stage_done(self, requested: Iterable[float], now: float, stage: str | None = None) -> None:
        """Replicas requested at ``requested`` (unix seconds) reached this service's stage at ``now``."""
        name = stage or STAGES.get(self.service, self.service)
        hist = self._stages.get(name)
        if hist is None:
            hist = self._stages[name] = self.sli.labels(self.service, name)
        for at in requested:
            if at > 0:  # 0: a request from before the field existed, or a hand-made one
                hist.observe(max(0.0, now - at))

    def refused(self, outcomes: Sequence[str]) -> None:
        """Commit verdicts other than ok/dup/gone/unschedulable: the ledger refused the decision."""
        for outcome in outcomes:
            self.refusals.labels(self.service, outcome.split(":", 1)[0]).inc()

    # -- exposition -------------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # all interfaces: containers expose it
        """Serve ``/metrics`` on ``port`` (0: not at all)."""
        if self._server is None:
            server = MetricsServer(self.registry, port, self.service, addr)
            self._server = server if server.serving else None

    def close(self) -> None:
        """Stop serving (tests run several services in one process)."""
        if self._server is not None:
            self._server.close()
            self._server = None


class MetricsServer:
    """``/metrics`` of ``registry`` on ``port`` (0: not served) until ``close``; a port that cannot be bound is
    logged and the service goes on (metrics must not keep it from its work)."""

    def __init__(self, registry: CollectorRegistry, port: int, service: str, addr: str = "0.0.0.0") -> None:
        self._server: Any = None
        if port <= 0:
            return
        try:  # all interfaces by default: containers expose it
            self._server, _thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as err:
            log.error("%s: metrics not served on port %d: %s", service, port, err)
            return
        log.info("%s: metrics on :%d/metrics", service, port)

    @property
    def serving(self) -> bool:
        """Whether ``/metrics`` is served (a port was given and could be bound), until ``close``."""
        return self._server is not None

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def requested_times(message: msgspec.Struct) -> list[float]:
    """When each replica a placement-pipeline message carries was requested (other messages: none)."""
    if isinstance(message, PlacementRequest):
        return [item.requested_at for item in message.items]
    if isinstance(message, PlacementFiltered | PlacementFitted):
        return [item.requested_at for item in message.request.items]
    if isinstance(message, PlacementScored):
        return [out.item.requested_at for out in message.outcomes]
    return []


def declared_names() -> set[str]:
    """Every metric name a service exposes (with the suffixes Prometheus adds), for dashboards' checks."""
    names: set[str] = set()
    for metric in ServiceMetrics("any").registry.collect():
        for sample in metric.samples:
            names.add(sample.name)
        names.add(metric.name)
        if metric.type == "histogram":
            names.update(f"{metric.name}_{s}" for s in ("bucket", "sum", "count"))
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
    return names
