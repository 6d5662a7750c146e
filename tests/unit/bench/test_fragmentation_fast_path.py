"""The replay's fast path of the fragmentation strategy makes the placement core's decisions.

With the plugin's own learning rule (``FragmentationFit.like_core``), every decision on a small random
trace equals ``place()`` on an incrementally updated ClusterSnapshot, with the ``fragmentation`` profile and
with the default profile (models that name no strategy get the multi-resource fragmentation scorer). CPU is
scarce on purpose, so the CPU dimension decides some placements.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.packing_lib.baselines import Choice
from bench.packing_lib.cluster import ClusterState, PodShape
from bench.packing_lib.core_policy import CorePolicy
from bench.packing_lib.fragpolicy import FragmentationFit
from bench.packing_lib.replay import replay
from bench.packing_lib.trace import Nodes, Pods
from shared.core.placement.filters import FILTERS


@pytest.fixture
def restore_filters():
    yield
    FILTERS.pop("trace_host", None)  # CorePolicy registers its bench-only filter


def small_cluster() -> Nodes:
    names = tuple(f"node-{i:02d}" for i in (5, 3, 0, 7, 1, 6, 2, 4))  # not in name order on purpose
    return Nodes(names=names, cpu=np.array([8, 16, 32, 12, 64, 16, 24, 20]) * 1000,
                 mem=np.array([64, 64, 128, 128, 64, 32, 64, 128]) * 1024,
                 gpus=np.array([2, 4, 8, 2, 1, 0, 4, 8]), gpu_type=np.array([0, 0, 1, 1, 0, -1, 1, 0]),
                 type_names=("G2", "T4"))


def random_pods(n: int, seed: int) -> Pods:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=n, p=[0.5, 0.3, 0.1, 0.1])  # share, whole, 2 whole GPUs, CPU only
    num_gpu = np.array([1, 1, 2, 0])[kinds]
    milli = np.where(kinds == 0, rng.choice([250, 300, 470, 500, 810], size=n), np.where(kinds == 3, 0, 1000))
    names = tuple(f"pod-{int(i)}" for i in rng.integers(0, n // 2, size=n))
    return Pods(names=names, cpu=rng.choice([0, 1000, 4000, 8000], size=n), mem=rng.choice([1024, 4096, 16384], size=n),
                num_gpu=num_gpu, gpu_milli=milli, spec=("",) * n)


class Recorder:
    """Wraps a policy and keeps its choices."""

    def __init__(self, policy, pods: Pods):
        self.policy, self.pods, self.name = policy, pods, policy.name
        self.choices: list[Choice | None] = []

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        choice = self.policy.choose(state, shape)
        self.choices.append(choice)
        return choice


@pytest.mark.parametrize(("seed", "strategy"), [(1, "fragmentation"), (2, "fragmentation"), (3, "default")])
def test_fast_path_decisions_equal_the_cores(restore_filters, seed, strategy):
    nodes, pods = small_cluster(), random_pods(120, seed)
    core = CorePolicy(strategy, nodes)

    def name_model(i: int) -> None:
        core.current_model = pods.names[i]

    by_core = Recorder(core, pods)
    curve_core = replay(nodes, pods, by_core, name_model)
    by_fast = Recorder(FragmentationFit.like_core(), pods)
    curve_fast = replay(nodes, pods, by_fast)
    assert len(by_core.choices) == len(by_fast.choices) > 40
    assert by_fast.choices == by_core.choices
    assert curve_fast.failed == curve_core.failed > 0  # the cluster fills up: failures are compared too
