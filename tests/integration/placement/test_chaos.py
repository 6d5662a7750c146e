"""Issue 12, item 8 (the short version; bench/chaos.py runs ten longer rounds): a round of random scale bursts
and cordons while NATS, Redis and every placement service are killed with SIGKILL and restarted, then the
invariants over its whole history: no acknowledged command lost, no GPU ever over capacity, the ledger equal
to the instances at every sample, and a settled cluster within 30 s (every replica RUNNING, or PENDING only
when no worker has room)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.adversary.chaos import SERVERS, SERVICES, ChaosConfig, run_chaos
from ops.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_a_chaos_round_keeps_every_invariant(tmp_path: Path) -> None:
    (result,) = await run_chaos(tmp_path, ChaosConfig(round_s=12.0, seed=12), 1, free_port(), free_port())
    report = json.dumps(result.summary(), indent=1)
    assert sorted(result.kills) == sorted((*SERVERS, *SERVICES)), report
    assert result.acked > 10 and result.samples > 5, report
    assert result.lost_commands == [], report
    assert result.overbooked == [], report
    assert result.ledger_mismatch == [], report
    assert result.pending_with_room == [], report
    assert result.quiesced_s is not None and result.quiesced_s <= 30.0, report
