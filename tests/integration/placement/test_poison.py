"""Issue 12 Done-when 4: no valid message is ever dropped because a co-batched message was bad.

The real services (as processes) against real NATS and Redis. Poison and valid messages are published before
the service starts, so its first pull takes them as one batch; the poison is dead-lettered with its reason and
the valid messages are applied.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shared.bus import streams, subjects
from shared.bus.messages import (
    FittedColumns,
    PlacementFitted,
    PlacementItem,
    PlacementRequest,
    PlacementScored,
    ScaleCommand,
    encode,
)
from shared.bus.runtime import prepare
from shared.core.placement.domain import GIB, Candidate, FitResult, ModelSpec
from shared.settings import Settings

from .conftest import TIMINGS, Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEEP = b"[" * 2000 + b"]" * 2000
SPEC_A = ModelSpec(name="model-a", source="x/a", weight_bytes=8 * GIB)
SPEC_B = ModelSpec(name="model-b", source="x/b", weight_bytes=8 * GIB)
SETTLE_S = 10.0  # below the first redelivery of a nak'ed batch with its backoff (2 s, then 4 s, ...)


def stack_settings(stack: Stack) -> Settings:
    """The settings the stack's services run with."""
    env = {k.removeprefix("GANTRY_").lower(): v for k, v in TIMINGS.items()}
    return Settings(nats_url=stack.env["GANTRY_NATS_URL"], redis_url=stack.env["GANTRY_REDIS_URL"], **env)


async def declare(stack: Stack) -> None:
    """Streams and consumers as the services declare them, so messages published now wait for them."""
    await prepare(stack.nc, stack_settings(stack), streams.ALL_CONSUMERS)


async def publish(stack: Stack, subject: str, body: bytes, msg_id: str) -> None:
    await stack.nc.jetstream().publish(subject, body, headers={"Nats-Msg-Id": msg_id})


def dead(stack: Stack, service: str, fragment: str) -> list[Any]:
    return [e for e in stack.dead_letters if e.service == service and fragment in e.reason]


async def test_a_scale_command_nested_2000_deep_does_not_lose_the_valid_commands_of_its_batch(stack: Stack) -> None:
    await declare(stack)
    await publish(stack, subjects.SCALE, encode(ScaleCommand(model="model-a", replicas=2, spec=SPEC_A)), "a")
    await publish(stack, subjects.SCALE, b'{"model": "model-a", "replicas": 1, "x": ' + DEEP + b"}", "deep")
    await publish(stack, subjects.SCALE, encode(ScaleCommand(model="model-b", replicas=3, spec=SPEC_B)), "b")
    stack.start_service("reconciler")

    async def both_scaled() -> bool:
        return len(await stack.instances("model-a")) == 2 and len(await stack.instances("model-b")) == 3

    await wait_until(both_scaled, SETTLE_S, "both valid scale commands applied")
    await wait_until(lambda: _async(dead(stack, "reconciler", "invalid ScaleCommand")), SETTLE_S, "the dead letter")
    [letter] = dead(stack, "reconciler", "")  # the decoder's RecursionError, reported as undecodable
    assert '"x": [[[' in letter.payload
    assert stack.crashed() == []


def fitted(batch_id: str, model: str = "m", **changes: Any) -> PlacementFitted:
    """A fitting result for one replica of ``model`` (one candidate: scoring answers for it either way)."""
    spec = ModelSpec(name="m", weight_bytes=GIB)
    request = PlacementRequest(
        batch_id=batch_id, items=(PlacementItem(instance_id=f"{batch_id}-0", model=model),), specs={"m": spec}
    )
    candidate = Candidate(worker="w0", gpu_indexes=(0,), vram_claims=(GIB,), strategy="single_gpu")
    msg = PlacementFitted(request=request, fitted={"m": FitResult(model="m", candidates=(candidate,))})
    return msgspec.structs.replace(msg, **changes)


def _past_the_table() -> bytes:
    """Columns pointing past the shared worker lists (refused at decode; a constructed message cannot hold it)."""
    ok = fitted("poison", fitted={}, worker_sets=(("w0",),),
                columns={"m": FittedColumns(strategy="single_gpu", workers=0, gpus=b"\x01")})
    raw = msgspec.json.decode(encode(ok))
    raw["columns"]["m"]["workers"] = 7
    return msgspec.json.encode(raw)


# Fitting results scoring fails on, keyed by what their dead letter says: each a real failure of its code path
# (the handler raising, or the decoder refusing).
POISONS = {
    "KeyError": encode(fitted("poison", model="ghost")),  # an item whose model has no spec in the request
    "past the end of its table": _past_the_table(),
    "OverflowError": encode(fitted(  # a claim no int64 holds
        "poison", fitted={}, worker_sets=(("w0",),),
        columns={"m": FittedColumns(strategy="single_gpu", workers=0, gpus=b"\x01", claim=2**70)},
    )),
}


@pytest.mark.parametrize("kind", sorted(POISONS))
async def test_a_fitting_result_scoring_fails_on_does_not_lose_the_valid_ones_of_its_batch(
    stack: Stack, kind: str
) -> None:
    scored: list[str] = []

    async def on_scored(msg: Any) -> None:
        scored.append(msgspec.json.decode(msg.data, type=PlacementScored).batch_id)

    await stack.nc.subscribe(subjects.PLACEMENT_SCORED, cb=on_scored)
    await declare(stack)
    await publish(stack, subjects.PLACEMENT_FITTED, encode(fitted("valid-1")), "valid-1")
    await publish(stack, subjects.PLACEMENT_FITTED, POISONS[kind], "poison")
    await publish(stack, subjects.PLACEMENT_FITTED, encode(fitted("valid-2")), "valid-2")
    stack.start_service("scoring")

    await wait_until(lambda: _async({"valid-1", "valid-2"} <= set(scored)), SETTLE_S, "both valid results scored")
    await wait_until(lambda: _async(dead(stack, "scoring", kind)), SETTLE_S, f"the {kind} dead letter")
    assert "poison" not in scored
    assert len(dead(stack, "scoring", "")) == 1
    assert stack.crashed() == []


async def _async(value: Any) -> Any:
    return value
