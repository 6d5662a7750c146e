"""The emulated fleet starts the instances of one assignment together, and still reports each on its own."""

from __future__ import annotations

from typing import Any

import pytest

from shared.bus import subjects
from shared.bus.messages import InstanceReports, InstanceStatus, MessageError, ModelFileUpdate, decode
from shared.core.placement.domain import GIB, Category, InstanceState, ModelFileState, ModelSpec, PlacementStrategy

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODELS = [
    ModelSpec(name=f"pack{n}", source=f"org/pack{n}", weight_bytes=2 * GIB, categories=(Category.EMBEDDING,),
              placement_strategy=PlacementStrategy.BINPACK)
    for n in range(2)
]


def reports_of(body: bytes) -> tuple[InstanceStatus, ...]:
    try:
        return decode(body, InstanceReports).reports
    except MessageError:
        return (decode(body, InstanceStatus),)


@pytest.mark.parametrize("download_delay", ["0", "0.3"])
async def test_each_instance_is_reported_starting_then_running_and_each_file_is_fetched_once(
    stack: Stack, download_delay: str
) -> None:
    reports: list[InstanceStatus] = []
    files: list[ModelFileUpdate] = []

    async def on_status(msg: Any) -> None:
        reports.extend(reports_of(msg.data))

    async def on_file(msg: Any) -> None:
        files.append(decode(msg.data, ModelFileUpdate))

    await stack.nc.subscribe(subjects.INSTANCE_STATUS, cb=on_status)
    await stack.nc.subscribe(subjects.MODEL_FILE, cb=on_file)
    stack.start_workers("fleet", "--count", "1", "--gpus", "2", "--heartbeat-interval", "0.2",
                        "--download-delay", download_delay, "--start-delay", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=1)
    for spec in MODELS:
        await stack.scale(spec, 3)

    async def all_running() -> bool:
        insts = await stack.instances()
        return len(insts) == 6 and all(i.state is InstanceState.RUNNING for i in insts)

    await wait_until(all_running, 60, "six RUNNING replicas")
    ids = {i.id for i in await stack.instances()}
    seen: dict[str, list[InstanceState]] = {}
    for r in reports:
        if not seen.get(r.instance_id) or seen[r.instance_id][-1] is not r.state:  # a re-send is a duplicate
            seen.setdefault(r.instance_id, []).append(r.state)
    assert seen == {i: [InstanceState.STARTING, InstanceState.RUNNING] for i in ids}
    ready = sorted(f.source for f in files if f.state is ModelFileState.READY)
    assert ready == ["org/pack0", "org/pack1"]
    downloading = sorted(f.source for f in files if f.state is ModelFileState.DOWNLOADING)
    assert downloading == ([] if download_delay == "0" else ["org/pack0", "org/pack1"])
