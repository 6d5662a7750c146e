"""The CP-SAT model on instances whose optimum is obvious by hand, and the placement checker."""

from __future__ import annotations

import pytest

from bench.packing_lib.optimal import (
    GIB,
    Instance,
    SmallReplica,
    SmallWorker,
    check,
    gantry_place,
    random_instance,
    solve,
    with_spare,
)


def w(name: str, gpus: int = 1, gib: int = 80, ram: int = 512) -> SmallWorker:
    return SmallWorker(name=name, vram=(gib * GIB,) * gpus, ram=ram * GIB, product="H100")


def r(gib: int, gpus: int = 1, ram: int = 0) -> SmallReplica:
    return SmallReplica(model=f"m{gib}", gpus=gpus, vram=gib * GIB, ram=ram * GIB)


@pytest.mark.parametrize(
    ("workers", "replicas", "optimum"),
    [
        ((w("a"), w("b")), (r(40), r(40)), 1),  # two halves share one GPU
        ((w("a"), w("b"), w("c")), (r(50), r(50), r(50)), 3),  # no two fit one GPU
        ((w("a", ram=64), w("b", ram=64)), (r(10, ram=40), r(10, ram=40)), 2),  # RAM forces two workers
        ((w("a"), w("b", gpus=2)), (r(70, gpus=2),), 1),  # only b has two GPUs
        ((w("a", gpus=2), w("b", gpus=2)), (r(60), r(60), r(30), r(30)), 2),  # 60+30 twice... on 2 GPUs each
    ],
)
def test_cp_sat_finds_the_hand_computed_optimum(workers, replicas, optimum):
    best = solve(Instance(seed=0, workers=workers, replicas=replicas))
    assert best is not None and best.proven
    assert best.workers == optimum


def test_an_instance_no_packing_can_host_has_no_optimum():
    assert solve(Instance(seed=0, workers=(w("a", gib=24),), replicas=(r(40),))) is None


def test_check_counts_workers_and_rejects_overcommits():
    inst = Instance(seed=0, workers=(w("a"), w("b")), replicas=(r(40), r(50)))
    assert check(inst, [(0, (0,)), (1, (0,))]) == 2
    assert check(inst, [(0, (0,)), None]) == 1
    with pytest.raises(ValueError, match="overcommits"):
        check(inst, [(0, (0,)), (0, (0,))])


def test_random_instances_always_have_a_packing():
    for seed in range(3):
        inst = random_instance(seed)
        assert 2 <= len(inst.workers) <= 8 and 5 <= len(inst.replicas) <= 30
        assert solve(inst, time_limit_s=3.0) is not None


def test_the_spare_worker_copies_the_first_and_sorts_last():
    inst = random_instance(5)
    spared = with_spare(inst)
    assert spared.workers[:-1] == inst.workers and spared.replicas == inst.replicas
    spare = spared.workers[-1]
    assert (spare.vram, spare.ram) == (inst.workers[0].vram, inst.workers[0].ram)
    assert spare.name > max(w.name for w in inst.workers)


def test_gantry_binpack_fills_one_worker_before_opening_the_next():
    inst = Instance(seed=0, workers=(w("a", gpus=2), w("b", gpus=2)), replicas=(r(40), r(40), r(40), r(40)))
    placements = gantry_place(inst, "binpack")
    assert check(inst, placements) == 1
