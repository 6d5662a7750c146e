"""Packing harness: trace loading, inflation, the replay loop and the policies on small inputs."""

from __future__ import annotations

import numpy as np
import pytest

from bench.packing_lib.baselines import BestFit, DotProduct, RandomFit
from bench.packing_lib.cluster import ClusterState, PodShape
from bench.packing_lib.fragpolicy import FragmentationFit
from bench.packing_lib.replay import replay
from bench.packing_lib.trace import Nodes, Pods, inflate, load_nodes, load_pods


def tiny_nodes() -> Nodes:
    return Nodes(names=("n-b", "n-a"), cpu=np.array([8000, 8000]), mem=np.array([1000, 1000]),
                 gpus=np.array([2, 2]), gpu_type=np.array([0, 0]), type_names=("T4",))


def pods(*rows: tuple[int, int, int, int]) -> Pods:
    """Pods from (cpu, mem, num_gpu, gpu_milli) rows."""
    a = np.array(rows, dtype=np.int64)
    return Pods(names=tuple(f"p{i}" for i in range(len(rows))), cpu=a[:, 0], mem=a[:, 1], num_gpu=a[:, 2],
                gpu_milli=a[:, 3], spec=("",) * len(rows))


def test_the_shipped_cluster_has_6212_gpus_on_1523_nodes():
    nodes = load_nodes()
    assert (len(nodes), nodes.total_gpus) == (1523, 6212)


def test_inflation_reaches_130_percent_of_capacity_and_is_seeded():
    base = load_pods("multigpu20")
    a = inflate(base, 6_212_000, 1.3, seed=7)
    b = inflate(base, 6_212_000, 1.3, seed=7)
    assert a.names == b.names
    assert a.gpu_demand.sum() >= 1.3 * 6_212_000 > a.gpu_demand.sum() - a.gpu_demand.max()


def test_a_sharing_pod_cannot_overcommit_a_gpu():
    state = ClusterState(tiny_nodes())
    shape = PodShape(cpu=0, mem=0, num_gpu=1, gpu_milli=600, spec="")
    state.allocate(0, (0,), shape)
    with pytest.raises(ValueError, match="cannot take"):
        state.allocate(0, (0,), shape)


def test_feasibility_checks_cpu_memory_and_whole_gpus():
    state = ClusterState(tiny_nodes())
    state.allocate(0, (0,), PodShape(cpu=7000, mem=10, num_gpu=1, gpu_milli=500, spec=""))
    assert state.feasible(PodShape(cpu=2000, mem=0, num_gpu=1, gpu_milli=100, spec="")).tolist() == [False, True]
    assert state.feasible(PodShape(cpu=0, mem=0, num_gpu=2, gpu_milli=1000, spec="")).tolist() == [False, True]
    assert state.feasible(PodShape(cpu=0, mem=991, num_gpu=0, gpu_milli=0, spec="")).tolist() == [False, True]
    assert state.feasible(PodShape(cpu=0, mem=0, num_gpu=1, gpu_milli=100, spec="P100")).tolist() == [False, False]


def test_unallocated_gpus_are_capacity_minus_placed_demand():
    # 4 GPUs: 0.5 + 0.5 (one GPU) + 1 + 1 placed, a 2-GPU pod that no longer fits, then 0.2 placed.
    p = pods((0, 0, 1, 500), (0, 0, 1, 500), (0, 0, 1, 1000), (0, 0, 1, 1000), (0, 0, 2, 1000), (0, 0, 1, 200))
    curve = replay(tiny_nodes(), p, BestFit(seed=0))
    assert curve.failed == 1
    assert curve.at(100) == pytest.approx(1.0)  # first reached at the 2-GPU pod (125%): 3 of 4 placed
    assert curve.at(130) == pytest.approx(0.8)
    assert curve.allocated_share[-1] == pytest.approx(0.8)


def test_fragmentation_fit_keeps_a_whole_gpu_free_for_the_whole_gpu_pods_it_has_seen():
    # After seeing whole-GPU pods, a half-GPU pod joins the other half rather than breaking a fresh GPU.
    p = pods((0, 0, 1, 1000), (0, 0, 1, 500), (0, 0, 1, 500), (0, 0, 1, 1000), (0, 0, 1, 1000))
    curve = replay(tiny_nodes(), p, FragmentationFit())
    assert curve.failed == 0 and curve.unallocated[-1] == pytest.approx(0.0)


@pytest.mark.parametrize("policy", [RandomFit(1), BestFit(1), DotProduct(1), FragmentationFit()],
                         ids=lambda p: p.name)
def test_every_policy_replays_a_slice_of_the_real_trace(policy):
    nodes = load_nodes()
    p = inflate(load_pods("default"), 1000 * nodes.total_gpus, 1.3, seed=42)
    p = p.take(np.arange(100))
    curve = replay(nodes, p, policy)
    assert curve.placed + curve.failed == 100
    assert 0 < curve.allocated_share[-1] < 1
