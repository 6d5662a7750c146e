"""Python work of one steady decode step of the engine server's step loop, counted (not timed).

At 16 streams the server's CPU per token swings by ±15% from run to run with the machine's load (the step runs
with cold caches after each ~7 ms sleep), so a change of a few % to the step's Python cannot be seen in
``bench/engine_server.py``. This counts instead: the real runner, engine and SSE sinks (writing to
``/dev/null``) are driven by hand, and a tracer counts the bytecodes and Python calls of each steady step (all
streams decoding, none finishing). The count is deterministic, so an A/B of two worktrees needs one run each.

Run: ``.venv/bin/python bench/engine_step_ops.py [--streams 16,64,256]``; writes
docs/benchmarks/engine_step_ops.{json,png} (``--no-write``: print only); the last line is the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import save  # noqa: E402
from services.engine_server.runner import EngineRunner  # noqa: E402
from services.engine_server.server import ServerOptions, build_engine  # noqa: E402
from services.engine_server.sse import SseSink  # noqa: E402
from services.engine_server.textgen import TextModel  # noqa: E402
from services.engine_server.writer import Conn, SocketWriter  # noqa: E402
from shared.core.engine import Request  # noqa: E402

PROMPT_LEN = 128
TOKENS = 120  # per stream: long enough for 100 steady steps after the prefill


_ASYNCIO = os.sep + "asyncio" + os.sep


class OpCounter:
    """A ``sys.settrace`` tracer counting bytecodes (by function) and Python calls."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.calls = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> OpCounter | None:
        if event == "call":
            if _ASYNCIO in frame.f_code.co_filename:
                # the event loop's own machinery (a timer heap's comparisons) varies with timers scheduled by
                # real time elsewhere: left out, so the count repeats exactly on a loaded host
                return None
            self.calls += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            self.ops[frame.f_code.co_qualname] += 1
        return self


async def count_steady_steps(streams: int, text: TextModel) -> tuple[int, OpCounter]:
    """Run ``streams`` requests to the end; trace the steps where every stream decodes. Returns (steps, counts)."""
    wall = [0.0]  # the runner's clock: set to each step's deadline, so no step looks late (a late one resyncs)
    runner = EngineRunner(build_engine(ServerOptions(max_num_seqs=max(256, streams))), clock=lambda: wall[0])
    writer = SocketWriter()
    runner.on_flush.append(writer.flush)
    loop = asyncio.get_running_loop()
    rng = random.Random(streams)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for i in range(streams):
            rid = f"cmpl-{i:032x}"
            req = Request(rid, [rng.randrange(100, 4000) for _ in range(PROMPT_LEN)], max_tokens=TOKENS,
                          ignore_eos=True, eos_token_id=text.eos_token_id, filler_token=text.filler,
                          sampled_token_ids=text.sample(rid, TOKENS, True))
            sink = SseSink(rid, "m", 0, False, True, text.json_piece, text.eos_token_id, text.json_pieces)
            sink.attach_writer(Conn(os.dup(null), loop), writer)
            runner.submit(req, sink)
        runner._loop = loop  # the steps are driven here, one by one, instead of by timers
        counter, steps = OpCounter(), 0
        runner._begin()
        while runner._step is not None:
            if runner._handle is not None:
                runner._handle.cancel()
                runner._handle = None
            out, deadline = runner._step[0], runner._step[3]
            wall[0] = deadline
            running = runner.engine.scheduler.running
            steady = (out.num_tokens == streams == len(running)
                      and all(1 < r.num_output_tokens < TOKENS - 1 for r in running))
            if steady:
                sys.settrace(counter)
                runner._end()
                sys.settrace(None)
                steps += 1
            else:
                runner._end()
        if runner._handle is not None:
            runner._handle.cancel()
        return steps, counter
    finally:
        os.close(null)


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    """Bytecodes per token and Python calls per step, one bar each per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["streams"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(labels, [r["bytecodes_per_token"] for r in rows])
    left.set(xlabel="concurrent streams", ylabel="bytecodes per streamed token", title="step loop work per token")
    right.bar(labels, [r["python_calls_per_step"] for r in rows], color="tab:orange")
    right.set(xlabel="concurrent streams", ylabel="Python calls per step", title="calls per steady step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="16,64,256")
    ap.add_argument("--top", type=int, default=8, help="functions listed per concurrency")
    ap.add_argument("--no-write", action="store_true", help="print only (do not overwrite docs/benchmarks)")
    args = ap.parse_args()
    text = TextModel()
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        steps, c = asyncio.run(count_steady_steps(n, text))
        total = sum(c.ops.values())
        row = {"streams": n, "steps": steps, "bytecodes_per_step": total / steps,
               "bytecodes_per_token": total / steps / n, "python_calls_per_step": c.calls / steps,
               "top": {k: v / steps for k, v in c.ops.most_common(args.top)}}
        rows.append(row)
        print(f"{n:4d} streams: {row['bytecodes_per_token']:.0f} bytecodes per token, "
              f"{row['python_calls_per_step']:.0f} Python calls per step ({steps} steady steps)", file=sys.stderr)
    result = {"bench": "engine_step_ops", "rows": rows}
    if not args.no_write:
        save("engine_step_ops", result, lambda png: plot(rows, png))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
