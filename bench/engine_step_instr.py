"""Machine instructions of the engine server's steady decode steps, counted by callgrind (not timed).

``bench/engine_step_ops.py`` counts bytecodes, but a bytecode is not a unit of cost: a C call that replaces a
few bytecodes can cost more (``operator.attrgetter`` on a slots object goes through the generic attribute
lookup, ~300 instructions a call). This drives the same steps (the real runner, engine and SSE sinks writing to
``/dev/null``) and runs each steady step through ``operator.call``, so that callgrind collects only inside
those calls. The count is deterministic; the event loop's thread only (the writer thread, which sends the
chunks of steps with more than ``INLINE_MAX`` streams, is not counted).

Run (valgrind must be installed; a run takes a few minutes at 64 streams)::

    NS=16 valgrind --tool=callgrind --toggle-collect=_operator_call \\
        --callgrind-out-file=/tmp/steps.cg .venv/bin/python bench/engine_step_instr.py

and read ``I refs`` on the last line (instructions of all steady steps; the script prints how many there were).

Automatic garbage collection is off while the steps run: where a collection lands depends on every allocation
before it, so an unrelated change could move one (4.4 M instructions at 16 streams, a sixth of the total) into
or out of the counted steps. What would trigger collections is printed instead: the steps' net new objects
tracked by the collector (``gc.get_count()``), which a steady decode step should leave at about zero.
"""

from __future__ import annotations

import asyncio
import gc
import operator
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import engine_step_ops as ops
from services.engine_server.runner import EngineRunner


def main() -> None:
    n = int(os.environ.get("NS", "16"))
    collecting = [False]
    tracked = [0]  # net new GC-tracked objects over the counted steps
    end = EngineRunner._end

    def timed_end(self: EngineRunner) -> None:
        if collecting[0]:
            before = gc.get_count()[0]
            operator.call(end, self)
            tracked[0] += gc.get_count()[0] - before
        else:
            end(self)

    def bracket(tracer: Any) -> None:
        # the driver brackets each steady step with settrace(counter) ... settrace(None): here no tracer is
        # installed, the step goes through operator.call instead
        collecting[0] = tracer is not None

    EngineRunner._end = timed_end  # type: ignore[method-assign]
    settrace = ops.sys.settrace
    ops.sys.settrace = bracket  # type: ignore[assignment]
    text = ops.TextModel()
    gc.collect()
    gc.disable()
    try:
        steps, _ = asyncio.run(ops.count_steady_steps(n, text))
    finally:
        gc.enable()
        ops.sys.settrace = settrace
        EngineRunner._end = end  # type: ignore[method-assign]
    print(f"{n} streams: {steps} steady steps, {steps * n} tokens (divide callgrind's I refs by these); "
          f"net new GC-tracked objects per step {tracked[0] / max(steps, 1):+.2f}")


if __name__ == "__main__":
    main()
