"""The scoring service's CPU per decision, in-process: the end-to-end bench's batches without servers.

A fleet like ``placement_e2e``'s (1,000 workers × 8 H100-80GB, 50 binpack embedding models asked for round-robin,
~10 replicas per batch) is run through the filter and fitting stages' pure steps; the scoring stage then decodes
each fitted message from its wire bytes, scores it (each choice assumed before the next) and encodes the result,
and its snapshot follows what the rest of the stack would send it: each decision's commit (an instance event),
the model's files READY on the chosen worker, and usage heartbeats of the workers that took replicas. Only the
scoring stage's work is timed (thread CPU time); the digest of every outcome is printed so that two versions of
the code can be checked for identical choices, totals and breakdowns.

Run: ``.venv/bin/python bench/scoring_batches.py [--batches 400] [--repeat 5]``; one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

import services.scoring.service as scoring_service
from services.filter.service import FilterService
from services.fitting.service import FittingService
from services.scoring.service import ScoringService
from shared.bus.messages import (
    Heartbeat,
    InstanceEvent,
    ModelFileUpdate,
    PlacementFitted,
    PlacementItem,
    PlacementRequest,
    PlacementScored,
    decode,
    encode,
)
from shared.core.placement.domain import (
    GIB,
    Category,
    Gpu,
    GpuUsage,
    InstanceState,
    ModelFileState,
    ModelSpec,
    PlacementStrategy,
    Worker,
)
from shared.core.placement.lifecycle import instance_from_decision
from shared.settings import Settings

NOW = 1_000_000.0


def spec(n: int) -> ModelSpec:
    """placement_e2e's models."""
    return ModelSpec(name=f"bench{n}", source=f"bench/m{n}", weight_bytes=2 * GIB, categories=(Category.EMBEDDING,),
                     placement_strategy=PlacementStrategy.BINPACK)


class _Timed:
    """Thread CPU time spent in one function (the decision proper: ``score_columns``)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any) -> Any:
        if self.count_calls:
            sys.setprofile(self._count)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        t = time.thread_time()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.thread_time() - t
            sys.setprofile(None)
            if self.count_calls:
                self.peak_bytes += tracemalloc.get_traced_memory()[1] - base
            self.calls += 1

    peak_bytes = 0

    count_calls = False
    function_calls = 0

    def _count(self, frame: object, event: str, arg: object) -> None:
        """A deterministic proxy of the work: every Python and C function call made by a decision."""
        if event in ("call", "c_call"):
            self.function_calls += 1


def run(
    batches: int, per_batch: int, workers: int, models: int, skip: int, count_calls: bool = False
) -> tuple[list[float], list[float], float, str]:
    """Per-batch scoring CPU seconds (whole stage, and its ``score`` calls), CPU seconds per decision proper
    (``score_columns``, after the first ``skip`` batches) and the outcomes' digest."""
    clock = [NOW]
    settings = Settings()
    stages = [kind(settings, clock=lambda: clock[0]) for kind in (FilterService, FittingService, ScoringService)]
    flt, fit, sc = stages
    decide = scoring_service.score_columns = _Timed(scoring_service.score_columns)
    decide.count_calls = count_calls
    if count_calls:
        tracemalloc.start()
    assert isinstance(flt, FilterService) and isinstance(fit, FittingService) and isinstance(sc, ScoringService)
    fleet = [Worker(name=f"w{i}", gpus=tuple(Gpu(index=g, product="H100-SXM-80GB", vram_total=80 * GIB)
                                             for g in range(8)), ram_total=1024 * GIB, last_heartbeat=NOW)
             for i in range(workers)]
    for s in stages:
        for w in fleet:
            s.snapshot.upsert_worker(w)
            s.feed.inventory[w.name] = w
            s.feed.last_seen[w.name] = NOW
    usage: dict[str, dict[int, int]] = {}
    digest = hashlib.sha256()
    whole: list[float] = []
    core: list[float] = []
    sent = 0
    for b in range(batches):
        if b == skip:
            decide.seconds, decide.calls, decide.function_calls, decide.peak_bytes = 0.0, 0, 0, 0
        items = []
        for _ in range(per_batch):
            n = sent % models
            items.append(PlacementItem(instance_id=f"i{sent}", model=f"bench{n}", requested_at=clock[0]))
            sent += 1
        specs = {it.model: spec(int(it.model[5:])) for it in items}
        req = PlacementRequest(batch_id=f"b{b}", items=tuple(items), specs=specs)
        passed, _ = flt.filter_request(req)
        assert passed is not None
        fitted, failed = fit.fit(passed)
        assert failed is None
        wire = [encode(m) for m in fitted]
        t0 = time.thread_time()
        msgs = [decode(raw, PlacementFitted) for raw in wire]
        sc.expire_assumptions()
        t1 = time.thread_time()
        results = [sc.score(m) for m in msgs]
        t2 = time.thread_time()
        out = [encode(r) for r in results]
        t3 = time.thread_time()
        whole.append(t3 - t0)
        core.append(t2 - t1)
        for raw in out:
            digest.update(raw)
        # What the rest of the stack sends back: commits, files READY, usage heartbeats.
        clock[0] += 0.02
        for r in (decode(raw, PlacementScored) for raw in out):
            for o in r.outcomes:
                if o.decision is None:
                    continue
                inst = instance_from_decision(o.decision, o.item.instance_id, created_at=o.item.requested_at)
                inst = msgspec.structs.replace(inst, state=InstanceState.SCHEDULED)
                ev = InstanceEvent(instance=inst, at=clock[0])
                for s in stages:
                    s.feed.on_instance(ev)
                w = inst.worker
                assert w is not None
                sc.feed.on_file(ModelFileUpdate(worker=w, source=f"bench/m{inst.model[5:]}",
                                                state=ModelFileState.READY, progress=1.0))
                used = usage.setdefault(w, {g: 0 for g in range(8)})
                for g, c in zip(inst.gpu_indexes, inst.vram_claims, strict=True):
                    used[g] += c
                hb = Heartbeat(worker=w, seq=sent, gpus=tuple(GpuUsage(index=g, vram_used=u) for g, u in used.items()))
                sc.feed.on_heartbeat(hb, clock[0])
    if count_calls:
        n = max(decide.calls, 1)
        print(json.dumps({"function_calls_per_decision": round(decide.function_calls / n, 1),
                          "peak_extra_bytes_per_decision": round(decide.peak_bytes / n)}))
    return whole, core, decide.seconds / max(decide.calls, 1), digest.hexdigest()


def main() -> None:
    """Measure, print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--per-batch", type=int, default=10)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--skip", type=int, default=20, help="first batches not timed (caches warming)")
    p.add_argument("--count-calls", action="store_true", help="also count the function calls of each decision "
                   "and the peak memory it allocates (deterministic proxies; they slow the timing down)")
    a = p.parse_args()
    whole, core, decision, digest = run(a.batches, a.per_batch, a.workers, a.models, a.skip, a.count_calls)
    whole, core = whole[a.skip:], core[a.skip:]
    n = a.per_batch
    print(json.dumps({
        "us_per_decision_stage": round(sum(whole) / len(whole) / n * 1e6, 1),
        "us_per_decision_score": round(sum(core) / len(core) / n * 1e6, 1),
        "us_per_decision_proper": round(decision * 1e6, 1),
        "p50_batch_us": round(statistics.median(whole) * 1e6, 1),
        "digest": digest[:16],
    }))


if __name__ == "__main__":
    main()
