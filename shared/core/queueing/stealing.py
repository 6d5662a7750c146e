"""Global mode's decisions, pure: load-table shards, whom an idle node steals from, and how much.

FastDeploy's global scheduler (facts from its ``global_scheduler.py``): a node's load is the number of
requests queued in its Redis list; the load tables are ``load_shards_num`` sorted sets, a node's shard being
CRC-16/CCITT-FALSE of its name modulo the shard count; an idle node (own queue empty) scans shards
round-robin, takes up to 50 of the least-loaded peers whose score is >= ``min_load_score``, samples up to
10 of them, and steals ``ceil(batch / 2)`` requests from one chosen at random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

PEERS_PER_SHARD = 50
SAMPLE = 10
SHARDS_PER_LOOKUP = 5


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF), as FastDeploy's shard hash."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def load_shard(node: str, shards: int) -> int:
    """The load table a node reports to."""
    if shards < 1:
        raise ValueError(f"load_shards_num must be >= 1 (got {shards})")
    return crc16_ccitt_false(node.encode()) % shards


def steal_size(batch: int) -> int:
    """Requests one steal takes: half the engine's batch, rounded up (at least 1)."""
    return max(1, -(-batch // 2))


def choose_victim(peers: Sequence[tuple[str, float]], me: str, min_load_score: float, rng: random.Random) -> str | None:
    """A peer to steal from among ``(node, queued)`` pairs: random among a sample of the loaded ones.

    Only peers with at least ``min_load_score`` queued requests qualify; the lowest-loaded
    ``PEERS_PER_SHARD`` of them are considered (as FastDeploy's ``ZRANGEBYSCORE ... LIMIT 0 50``) and one of a
    random sample of ``SAMPLE`` is picked, which spreads concurrent stealers over the busy nodes.
    """
    loaded = sorted((score, node) for node, score in peers if node != me and score >= min_load_score)
    names = [node for _, node in loaded[:PEERS_PER_SHARD]]
    if not names:
        return None
    sample = rng.sample(names, min(SAMPLE, len(names)))
    return rng.choice(sample)
