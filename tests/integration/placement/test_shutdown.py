"""Services stop promptly and cleanly on SIGTERM, so Ctrl-C, `gantry down` and orchestrators never wait."""

from __future__ import annotations

import signal
import subprocess

from tests.integration.placement.conftest import CONSUMERS, Stack, wait_until


async def _every_consumer_has_a_waiting_pull(stack: Stack) -> bool:
    js = stack.nc.jetstream()
    for stream, durable in CONSUMERS:
        info = await js.consumer_info(stream, durable)
        if not info.num_waiting:
            return False
    return True


async def test_every_service_exits_with_code_zero_within_seconds_of_sigterm(stack: Stack) -> None:
    stack.start_services()
    await stack.wait_ready(workers=0)
    # Only a service whose pull loops are fetching exercises the shutdown path that used to hang.
    await wait_until(lambda: _every_consumer_has_a_waiting_pull(stack), 20, "pull loops fetching")
    for proc in stack.procs.values():
        proc.send_signal(signal.SIGTERM)
    codes = {}
    for name, proc in stack.procs.items():
        try:
            codes[name] = proc.wait(5)
        except subprocess.TimeoutExpired:
            codes[name] = None
    assert codes == {name: 0 for name in stack.procs}
