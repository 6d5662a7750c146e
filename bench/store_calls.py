"""Client CPU of the reconciler's hot store calls: scripts through redis-py against the lean connection.

One round is what the reconciler does per batch at 500 placements/s: a converge of 10 models, a commit of 10
decisions and 25 instance status reports (three script calls). Both stores run the same rounds, alternated, on
one redis-server started here (with the stack's ACL identities; the store speaks as the reconciler). Printed per
store: process CPU µs per script call (median of the repeats) and, as a deterministic proxy, the Python and C
function calls one round makes on the client.

Run: ``.venv/bin/python bench/store_calls.py [--rounds 400] [--repeat 5]``; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
import uvloop

from ops.auth import Credentials
from ops.servers import start_redis
from shared.core.placement.domain import GIB, Instance, InstanceState
from shared.core.placement.lifecycle import ACTIVE
from shared.state.resp import fast_packing
from shared.state.store import CommitItem, ScaleUp, StateStore

CALLS_PER_ROUND = 3


async def one_round(store: StateStore, k: int) -> None:
    """A converge of 10 models, a commit of 10 decisions, 25 status reports."""
    await store.converge_up([ScaleUp(model=f"m{j}", replicas=None) for j in range(10)], ACTIVE)
    await store.commit([
        CommitItem(Instance(id=f"m{j}-{k:06d}", model=f"m{j}", state=InstanceState.SCHEDULED, worker=f"w{j}",
                            gpu_indexes=(0, 1), vram_claims=(GIB, GIB), ram_claim=GIB))
        for j in range(10)
    ])
    await store.set_states([(f"m{j}-{k:06d}", f"w{j}", InstanceState.RUNNING) for j in range(25)])


async def measure(url: str, rounds: int, repeat: int) -> dict[str, Any]:
    """CPU µs per script call and function calls per round, for both stores."""
    stores = {"redis-py": StateStore(fast_packing(aioredis.from_url(url))), "lean": StateStore.from_url(url)}
    assert stores["lean"].scripts is not None and stores["redis-py"].scripts is None
    cpu: dict[str, list[float]] = {name: [] for name in stores}
    calls: dict[str, int] = {}
    for name, store in stores.items():  # warm both (scripts loaded, connections open)
        for k in range(20):
            await one_round(store, k)
        counter = [0]

        def count(frame: object, event: str, arg: object, counter: list[int] = counter) -> None:
            if event in ("call", "c_call"):
                counter[0] += 1

        sys.setprofile(count)
        try:
            await one_round(store, 20)
        finally:
            sys.setprofile(None)
        calls[name] = counter[0]
    for _ in range(repeat):
        for name, store in stores.items():
            t = time.process_time()
            for k in range(rounds):
                await one_round(store, k)
            cpu[name].append((time.process_time() - t) / rounds / CALLS_PER_ROUND * 1e6)
    for store in stores.values():
        await store.close()
    return {
        name: {"cpu_us_per_call": round(statistics.median(v), 1), "cpu_us_each": [round(x, 1) for x in v],
               "function_calls_per_round": calls[name]}
        for name, v in cpu.items()
    }


def main() -> None:
    """Start a redis-server, measure, print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    creds = Credentials.generate()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp), auth=creds)
        try:
            url = creds.url(server.url, "reconciler")
            result = uvloop.run(measure(url, args.rounds, args.repeat))
        finally:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
