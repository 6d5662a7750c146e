"""Request queueing core (seed 003): the broker in front of each engine, pure and clock-free.

``local`` is an in-memory bounded FIFO with TTL; ``global`` adds work stealing between nodes of one topic
(decisions here, atomic steps in ``shared/state/queue.py``); ``splitwise`` assigns a prefill and a decode node
by blurred least load. Units: every duration is in seconds (see ``params``).
"""

from shared.core.queueing.admission import ChunkedQuota, PullBudget, admit, required_blocks
from shared.core.queueing.local import DUPLICATE, LocalBroker
from shared.core.queueing.params import SCHEDULER_NAMES, UNBOUNDED, ParamError, SchedulerParams, parse_duration
from shared.core.queueing.request import ErrorCode, Output, PutAnswer, QueuedRequest, expiry_answer, is_expired
from shared.core.queueing.splitwise import (
    Assignment,
    NodeInfo,
    NodeLoad,
    SplitRequest,
    assign,
    blurred_least_load,
    live_nodes,
)
from shared.core.queueing.stealing import choose_victim, crc16_ccitt_false, load_shard, steal_size

__all__ = [
    "DUPLICATE",
    "SCHEDULER_NAMES",
    "UNBOUNDED",
    "Assignment",
    "ChunkedQuota",
    "ErrorCode",
    "LocalBroker",
    "NodeInfo",
    "NodeLoad",
    "Output",
    "ParamError",
    "PullBudget",
    "PutAnswer",
    "QueuedRequest",
    "SchedulerParams",
    "SplitRequest",
    "admit",
    "assign",
    "blurred_least_load",
    "choose_victim",
    "crc16_ccitt_false",
    "expiry_answer",
    "is_expired",
    "live_nodes",
    "load_shard",
    "parse_duration",
    "required_blocks",
    "steal_size",
]
