"""`gantry top` and `gantry workers` render a cluster snapshot without any server."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from ops.view import (
    ClusterSnapshot,
    ModelView,
    bar,
    gpu_usage,
    render_top,
)
from shared.core.placement.domain import (
    GIB,
    Gpu,
    Instance,
    InstanceState,
    SubordinateWorker,
    Worker,
    WorkerState,
)

T0 = 1_700_000_000.0


def h100(index: int, used: int = 0, schedulable: bool = True) -> Gpu:
    return Gpu(index=index, product="H100-SXM-80GB", vram_total=80 * GIB, vram_used=used, schedulable=schedulable)


def worker(name: str, gpus: int = 2, **kw: object) -> Worker:
    return Worker(name=name, gpus=tuple(h100(i) for i in range(gpus)), last_heartbeat=T0, **kw)  # type: ignore[arg-type]


def inst(iid: str, model: str, state: InstanceState, where: str | None = None, gpus: tuple[int, ...] = (),
         claim: int = 72 * GIB, reason: str | None = None) -> Instance:
    return Instance(id=iid, model=model, state=state, worker=where, gpu_indexes=gpus,
                    vram_claims=tuple(claim for _ in gpus), reason=reason)


def screen(snapshot: ClusterSnapshot, width: int = 160) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render_top(snapshot))
    return out.getvalue()


def snapshot(**kw: object) -> ClusterSnapshot:
    base: dict[str, object] = {
        "taken_at": T0,
        "workers": (worker("w1"), worker("w2")),
        "worker_states": {"w1": WorkerState.READY, "w2": WorkerState.READY},
    }
    base.update(kw)
    return ClusterSnapshot(**base)  # type: ignore[arg-type]


def test_gpu_claimed_sums_the_instances_holding_it() -> None:
    snap = snapshot(instances=(
        inst("a", "emb", InstanceState.RUNNING, "w1", (0,), claim=10 * GIB),
        inst("b", "rr", InstanceState.STARTING, "w1", (0,), claim=5 * GIB),
    ))
    w1g0 = gpu_usage(snap)[0]
    assert (w1g0.worker, w1g0.index, w1g0.claimed) == ("w1", 0, 15 * GIB)
    assert w1g0.models == ("emb", "rr")


@pytest.mark.parametrize("state", [InstanceState.PENDING, InstanceState.UNREACHABLE])
def test_pending_and_released_instances_hold_no_gpu(state: InstanceState) -> None:
    where, gpus = (None, ()) if state is InstanceState.PENDING else ("w1", (0,))
    snap = snapshot(instances=(inst("a", "m", state, where, gpus),))
    assert all(u.claimed == 0 and u.models == () for u in gpu_usage(snap))


def test_an_error_instance_holds_its_gpus_as_the_ledger_does() -> None:
    # Its claims stay in the ledger until it is replaced: `gantry top` must not show them as free.
    snap = snapshot(instances=(inst("b", "m", InstanceState.ERROR, "w1", (0,), claim=72 * GIB),))
    w1g0 = gpu_usage(snap)[0]
    assert (w1g0.claimed, w1g0.free, w1g0.models) == (72 * GIB, 8 * GIB, ("m",))


def test_views_and_the_snapshot_feed_agree_on_which_states_hold_gpus() -> None:
    from ops.view import HELD_STATES
    from shared.host.feed import HOLDING

    assert HELD_STATES == HOLDING


def test_free_vram_subtracts_the_larger_of_reported_use_and_claims() -> None:
    busy = Worker(name="w1", gpus=(h100(0, used=30 * GIB),), last_heartbeat=T0)
    snap = snapshot(workers=(busy,), instances=(inst("a", "m", InstanceState.RUNNING, "w1", (0,), 20 * GIB),))
    assert gpu_usage(snap)[0].free == 50 * GIB


def test_subordinate_gpus_count_for_their_own_worker() -> None:
    multi = Instance(
        id="x", model="big", state=InstanceState.RUNNING, worker="w1", gpu_indexes=(0,),
        vram_claims=(70 * GIB,),
        subordinates=(SubordinateWorker(worker="w2", gpu_indexes=(1,), vram_claims=(70 * GIB,)),),
    )
    usage = {(u.worker, u.index): u for u in gpu_usage(snapshot(instances=(multi,)))}
    assert usage[("w2", 1)].claimed == 70 * GIB
    assert usage[("w2", 1)].models == ("big",)


def test_cordoned_worker_makes_every_gpu_unschedulable() -> None:
    snap = snapshot(workers=(worker("w1", cordoned=True),))
    assert not any(u.schedulable for u in gpu_usage(snap))


@pytest.mark.parametrize(("fraction", "filled"), [(0.0, 0), (0.5, 4), (0.9, 7), (1.0, 8)])
def test_bar_fills_in_proportion(fraction: float, filled: int) -> None:
    assert bar(fraction, cells=8).plain.count("█") == filled


def test_top_shows_one_row_per_worker_with_a_cell_per_gpu_and_its_model() -> None:
    text = screen(snapshot(
        models=(ModelView("llama", 1),),
        instances=(inst("a", "llama", InstanceState.RUNNING, "w2", (1,)),),
    ))
    assert "GPU0" in text and "GPU1" in text and "GPU2" not in text
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if "│ w2" in line)
    assert " 90%" in lines[row]
    assert "READY" in lines[row + 1] and "llama" in lines[row + 1]


def test_top_lists_pending_replicas_with_their_reason() -> None:
    text = screen(snapshot(
        models=(ModelView("huge", 1),),
        instances=(inst("p1", "huge", InstanceState.PENDING, reason="no GPU has 300.0 GiB allocatable"),),
    ))
    assert "pending replicas" in text
    assert "no GPU has 300.0 GiB allocatable" in text


def test_top_says_so_when_nothing_is_pending_and_no_worker_reported() -> None:
    text = screen(ClusterSnapshot(taken_at=T0))
    assert "no workers have reported yet" in text
    assert "no pending replicas" in text


def test_top_marks_workers_not_ready_and_cordoned_gpus() -> None:
    snap = snapshot(
        workers=(worker("w1"), Worker(name="w2", gpus=(h100(0, schedulable=False),), last_heartbeat=T0)),
        worker_states={"w1": WorkerState.NOT_READY, "w2": WorkerState.READY},
    )
    text = screen(snap)
    assert "NOT_READY" in text
    assert "cordoned" in text


def test_top_header_counts_instances_by_state_at_the_snapshot_time() -> None:
    text = screen(snapshot(instances=(
        inst("a", "m", InstanceState.RUNNING, "w1", (0,)),
        inst("b", "m", InstanceState.PENDING),
    )))
    header = text.splitlines()[0]
    assert "22:13:20 UTC" in header
    assert "PENDING=1" in header and "RUNNING=1" in header


def test_top_leaves_out_a_deleted_model_as_gantry_models_does() -> None:
    text = screen(snapshot(
        models=(ModelView("kept", 1), ModelView("gone", 0), ModelView("draining", 0)),
        instances=(inst("a", "kept", InstanceState.RUNNING, "w1", (0,)),
                   inst("b", "draining", InstanceState.DRAINING, "w2", (0,))),
    ))
    assert "models 2 " in text.splitlines()[0]
    assert "kept" in text and "draining" in text and "gone" not in text


def test_the_models_table_counts_failed_replicas_apart_from_running_ones() -> None:
    from ops.view import models_table

    snap = snapshot(models=(ModelView("m", 2),), instances=(
        inst("a", "m", InstanceState.RUNNING, "w1", (0,)), inst("b", "m", InstanceState.ERROR, "w2", (0,)),
    ))
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(models_table(snap))
    header, row = [line for line in out.getvalue().splitlines() if "MODEL" in line or "│ m" in line]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    columns = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert dict(zip(columns, cells, strict=True)) == {
        "MODEL": "m", "DESIRED": "2", "RUNNING": "1", "STARTING": "0", "PENDING": "0", "FAILED": "1", "OTHER": "0",
    }


def tour_snapshot(workers: int = 4, gpus: int = 8) -> ClusterSnapshot:
    """The README tour's shape: 8-GPU workers, a 4-GPU model on some, an 8B model, pending replicas with a long
    reason and a cordoned GPU."""
    ws = tuple(
        Worker(name=f"w{i}", gpus=tuple(h100(g, schedulable=not (i == 3 and g == 7)) for g in range(gpus)),
               last_heartbeat=T0)
        for i in range(workers)
    )
    insts = [inst(f"llama-70b-{i}", "llama-70b", InstanceState.RUNNING, f"w{i}", (1, 2, 3, 4)) for i in range(workers)]
    insts += [inst(f"llama-8b-{i}", "llama-8b", InstanceState.RUNNING, f"w{i}", (0,)) for i in range(3)]
    long_reason = "needs ≈159.70 GiB VRAM per replica over 4 GPUs; largest allocatable GPU: 80.00 GiB " * 3
    insts += [inst(f"llama-70b-p{i}", "llama-70b", InstanceState.PENDING, reason=long_reason) for i in range(4)]
    return snapshot(
        workers=ws, worker_states={w.name: WorkerState.READY for w in ws}, instances=tuple(insts),
        models=(ModelView("llama-70b", workers + 4, None), ModelView("llama-8b", 3, None)),
    )


def rendered_lines(snap: ClusterSnapshot, width: int, height: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, height=height, color_system=None).print(render_top(snap, width, height))
    return out.getvalue().rstrip("\n").split("\n")


@pytest.mark.parametrize("workers", [1, 4, 12, 64])
def test_top_fits_an_80x24_terminal(workers: int) -> None:
    lines = rendered_lines(tour_snapshot(workers), 80, 23)
    assert len(lines) <= 23
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert lines[0].startswith("gantry top ") and lines[-1] == "Ctrl-C to quit"


def test_compact_top_shows_every_worker_that_fits_and_counts_the_rest() -> None:
    lines = rendered_lines(tour_snapshot(64), 80, 23)
    worker_lines = [line for line in lines if line.startswith("w") and " READY " in line]
    assert 10 <= len(worker_lines) < 64
    assert any(line.startswith(f"... {64 - len(worker_lines)} more worker(s)") for line in lines)


def test_compact_cells_tag_the_model_and_mark_free_and_cordoned_gpus() -> None:
    lines = rendered_lines(tour_snapshot(4), 80, 23)
    w0, w3 = (next(line for line in lines if line.startswith(f"{w} ")).split("READY", 1)[1].split()
              for w in ("w0", "w3"))
    assert w0[0][0] == "B" and all(c[0] == "A" for c in w0[1:5])  # A=llama-70b, B=llama-8b (by name)
    assert w3[0] == "." and w3[-1] == "x"  # free, cordoned
    assert "A=llama-70b" in "\n".join(lines) and "B=llama-8b" in "\n".join(lines)
    assert any(line.startswith("pending llama-70b x4: needs") for line in lines)


def test_a_wide_terminal_keeps_the_full_grid() -> None:
    lines = rendered_lines(tour_snapshot(4), 160, 60)
    assert any("GPU7" in line for line in lines)


@pytest.mark.parametrize("width", [160, 40], ids=["full grid", "compact"])
def test_a_gpu_product_with_terminal_escapes_is_shown_harmless(width: int) -> None:
    # printed raw, a worker's product could clear the screen and draw "all workers READY" in its place
    evil = Gpu(index=0, product="\x1b[2J\x1b[31mFAKE: all workers READY\x07", vram_total=80 * GIB)
    shot = snapshot(workers=(Worker(name="w1", gpus=(evil,), last_heartbeat=T0),),
                    worker_states={"w1": WorkerState.READY})
    out = screen(shot, width)
    assert "\x1b" not in out and "\x07" not in out
