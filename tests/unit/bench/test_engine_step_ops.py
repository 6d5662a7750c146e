"""The step-loop bytecode counter is deterministic and counts each stream's share of a step."""

from __future__ import annotations

import asyncio

from bench.engine_step_ops import count_steady_steps
from services.engine_server.textgen import TextModel


def test_a_steady_step_count_repeats_exactly_and_grows_with_the_streams() -> None:
    text = TextModel()
    steps2, a = asyncio.run(count_steady_steps(2, text))
    _, again = asyncio.run(count_steady_steps(2, text))
    steps4, b = asyncio.run(count_steady_steps(4, text))
    assert steps2 > 50 and steps4 > 50
    assert a.ops == again.ops and a.calls == again.calls  # nothing timed, nothing random: the same count
    per_step2, per_step4 = sum(a.ops.values()) / steps2, sum(b.ops.values()) / steps4
    # the per-stream work (schedule, sample, emit, write) is counted: two more streams add well over 100
    # bytecodes each (a ratio would drift as the fixed per-step part and the per-stream part are trimmed)
    assert per_step4 - per_step2 > 2 * 100
    assert a.ops["SseSink.token"] > 0 and a.ops["Scheduler.schedule"] > 0
