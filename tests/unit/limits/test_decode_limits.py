"""A message that decodes is within the limits (shared.core.limits): every out-of-range value is refused at
decode with a one-line MessageError, never stored, never a crash later (issue 12, cases 1-4 and 8)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from shared.bus.messages import (
    AssignInstance,
    CordonCommand,
    EngineKVEvents,
    EngineMetrics,
    Heartbeat,
    InstanceStatus,
    MessageError,
    ModelFileUpdate,
    PlacementScored,
    ScaleCommand,
    WorkerRegistration,
    decode,
)
from shared.core.limits import MAX_GPU_VRAM, MAX_GPUS_PER_WORKER, MAX_MESSAGE_BYTES, MAX_REPLICAS, first_repeat

GIB = 1 << 30


def _raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def worker(**over: Any) -> dict[str, Any]:
    w = {"name": "w0", "gpus": [{"index": 0, "vram_total": 80 * GIB}], "ram_total": 512 * GIB}
    w.update(over)
    return w


SPEC = {"name": "llama-8b", "source": "meta/llama", "replicas": 1}

REFUSED: list[tuple[str, type[msgspec.Struct], Any]] = [
    # case 1: replica counts past the limit
    ("scale 10**38 replicas", ScaleCommand,
     {"model": "llama-8b", "replicas": 123456789012345678901234567890123456789}),
    ("scale 1e9 replicas", ScaleCommand, {"model": "llama-8b", "replicas": 1_000_000_000}),
    ("scale limit + 1", ScaleCommand, {"model": "llama-8b", "replicas": MAX_REPLICAS + 1}),
    ("spec 1e9 replicas", ScaleCommand,
     {"model": "m", "replicas": 1, "spec": {**SPEC, "name": "m", "replicas": 10**9}}),
    ("negative replicas", ScaleCommand, {"model": "llama-8b", "replicas": -1}),
    # case 2: physical bounds of an inventory
    ("VRAM 2**64", WorkerRegistration, {"worker": worker(gpus=[{"index": 0, "vram_total": 2**64}])}),
    ("VRAM past the limit", WorkerRegistration,
     {"worker": worker(gpus=[{"index": 0, "vram_total": MAX_GPU_VRAM + 1}])}),
    ("RAM 2**64", WorkerRegistration, {"worker": worker(ram_total=2**64)}),
    ("negative VRAM", WorkerRegistration, {"worker": worker(gpus=[{"index": 0, "vram_total": -1}])}),
    ("GPU index 2**40", WorkerRegistration, {"worker": worker(gpus=[{"index": 2**40, "vram_total": GIB}])}),
    ("too many GPUs", WorkerRegistration,
     {"worker": worker(gpus=[{"index": i, "vram_total": GIB} for i in range(MAX_GPUS_PER_WORKER + 1)])}),
    ("heartbeat usage 2**64", Heartbeat, {"worker": "w0", "gpus": [[0, 2**64]]}),
    ("heartbeat negative RAM", Heartbeat, {"worker": "w0", "ram_used": -5}),
    # case 3: negative claims
    ("spec negative vram_claim", ScaleCommand,
     {"model": "m", "replicas": 1, "spec": {"name": "m", "vram_claim": -80 * GIB}}),
    ("spec negative ram_claim", ScaleCommand, {"model": "m", "replicas": 1, "spec": {"name": "m", "ram_claim": -1}}),
    ("spec negative weights", ScaleCommand, {"model": "m", "replicas": 1, "spec": {"name": "m", "weight_bytes": -1}}),
    ("assign negative claim", AssignInstance,
     {"instance_id": "m-1", "model": "m", "gpu_indexes": [0], "vram_claims": [-80 * GIB]}),
    ("scored negative claim", PlacementScored, {"batch_id": "b", "outcomes": [{
        "item": {"instance_id": "m-1", "model": "m"},
        "decision": {"model": "m", "score": 1.0, "breakdown": {},
                     "candidate": {"worker": "w0", "gpu_indexes": [0], "vram_claims": [-1]}}}]}),
    # case 8: names
    ("model ../../etc/passwd", ScaleCommand, {"model": "../../etc/passwd", "replicas": 1}),
    ("model with a wildcard", ScaleCommand, {"model": "m.*", "replicas": 1}),
    ("model with a quote", ScaleCommand, {"model": 'm"', "replicas": 1}),
    ("empty model name", ScaleCommand, {"model": "", "replicas": 1}),
    ("64-char model name", ScaleCommand, {"model": "m" * 64, "replicas": 1}),
    ("worker with a dot", WorkerRegistration, {"worker": worker(name="w.0")}),
    ("worker with a trailing newline", WorkerRegistration, {"worker": worker(name="w0\n")}),
    ("model with a trailing newline", ScaleCommand, {"model": "m\n", "replicas": 1}),
    ("instance id with a newline", InstanceStatus, {"instance_id": "m-1\n", "worker": "w0", "state": "RUNNING"}),
    ("worker >", CordonCommand, {"worker": ">"}),
    ("status worker *", InstanceStatus, {"instance_id": "m-1", "worker": "*", "state": "RUNNING"}),
    ("engine queue past any real server's", EngineMetrics, {
        "instance_id": "e1", "model": "m", "url": "http://127.0.0.1:8001", "ts": 1.0, "num_requests_running": 0,
        "num_requests_waiting": (1 << 63) - 1, "kv_cache_usage_perc": 0.0}),
    ("KV events past the bound in all", EngineKVEvents, {"instance_id": "e1", "model": "m", "seq": 0, "batch": [
        1.0, [["BlockStored", list(range(40_000)), None, [], 16], ["BlockRemoved", list(range(40_000))]]]}),
    # states only the reconciler sets
    ("worker reports PENDING", InstanceStatus, {"instance_id": "m-1", "worker": "w0", "state": "PENDING"}),
    ("worker reports DRAINING", InstanceStatus, {"instance_id": "m-1", "worker": "w0", "state": "DRAINING"}),
    ("worker reports UNREACHABLE", InstanceStatus, {"instance_id": "m-1", "worker": "w0", "state": "UNREACHABLE"}),
    ("file progress NaN-like", ModelFileUpdate, {"worker": "w0", "source": "s", "state": "READY", "progress": 1e400}),
    ("1 MB source", ModelFileUpdate, {"worker": "w0", "source": "x" * (1 << 20), "state": "READY"}),
]


@pytest.mark.parametrize(("case", "kind", "payload"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_out_of_range_input_is_refused_at_decode(case: str, kind: type[msgspec.Struct], payload: Any) -> None:
    with pytest.raises(MessageError) as err:
        decode(_raw(payload), kind)
    assert "\n" not in str(err.value)


def test_a_2000_deep_unknown_field_is_refused_not_a_recursion_error() -> None:
    body = b'{"model":"m","replicas":1,"x":' + b"[" * 2000 + b"]" * 2000 + b"}"
    with pytest.raises(MessageError, match="nested deeper"):
        decode(body, ScaleCommand)


def test_a_message_past_the_size_limit_is_refused_before_decoding() -> None:
    body = b'{"model":"m","replicas":1,"x":"' + b"a" * MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(MessageError, match="more than"):
        decode(body, ScaleCommand)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (ScaleCommand, {"model": "llama-3.1-8b", "replicas": MAX_REPLICAS, "spec": {**SPEC, "name": "llama-3.1-8b"}}),
        (WorkerRegistration, {"worker": worker(gpus=[{"index": 7, "vram_total": MAX_GPU_VRAM}])}),
        (AssignInstance, {"instance_id": "m-ab01", "model": "m", "gpu_indexes": [0], "vram_claims": [0]}),
        (CordonCommand, {"worker": "rack3_host2", "gpu_index": 3}),
        # a draining replica's idle report and a removal's confirmation carry the state the worker last knew
        (InstanceStatus, {"instance_id": "m-1", "worker": "w0", "state": "DRAINING", "idle": True}),
        (InstanceStatus, {"instance_id": "m-1", "worker": "w0", "state": "DRAINING", "deleted": True}),
    ],
)
def test_values_at_the_limits_decode(kind: type[msgspec.Struct], payload: Any) -> None:
    assert decode(_raw(payload), kind) is not None


@pytest.mark.parametrize(("keys", "repeat"), [
    ([], None), (["a"], None), (["a", "b", "c"], None), (["a", "b", "a"], "a"), (["a", "b", "b", "a"], "b"),
    ([str(i) for i in range(100_000)] + ["99999"], "99999"),  # one pass: a huge list costs what it is long
])
def test_first_repeat_names_the_first_key_seen_twice(keys: list[str], repeat: str | None) -> None:
    assert first_repeat(keys) == repeat
