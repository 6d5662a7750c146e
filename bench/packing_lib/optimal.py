"""Optimality check: the fewest workers that can host a small instance, by OR-Tools CP-SAT.

An instance is a few workers (GPUs with VRAM, RAM) and up to 30 replicas, each asking for ``gpus``
GPUs on one worker with ``vram`` bytes on each, plus ``ram`` bytes of host memory. A strategy places
the replicas one after another (online, in the given order); the optimum sees them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

GIB = 1 << 30


@dataclass(frozen=True)
class SmallWorker:
    """A worker of a small instance."""

    name: str
    vram: tuple[int, ...]  # bytes per GPU
    ram: int
    product: str


@dataclass(frozen=True)
class SmallReplica:
    """A replica of a small instance: ``gpus`` GPUs on one worker, ``vram`` bytes on each."""

    model: str
    gpus: int
    vram: int
    ram: int


@dataclass(frozen=True)
class Instance:
    """Workers, and replicas in arrival order."""

    seed: int
    workers: tuple[SmallWorker, ...]
    replicas: tuple[SmallReplica, ...]


Assignment = tuple[int, tuple[int, ...]]  # worker index, GPU indexes


@dataclass(frozen=True)
class Optimum:
    """What CP-SAT proved: the fewest workers, or a lower bound if it ran out of time."""

    workers: int
    proven: bool


PRODUCTS: tuple[tuple[str, int], ...] = (("L4", 24), ("L40S", 48), ("H100-SXM-80GB", 80))


def random_instance(seed: int, max_replicas: int = 30, max_workers: int = 8, mixed: bool = False) -> Instance:
    """A random instance known to fit: LLM replicas on whole GPUs mixed with small fractional models
    (embeddings, rerankers, small quantized models), like the trace's mix.

    ``mixed=False``: one worker type per instance (a node pool); ``mixed=True``: every worker draws its
    own GPU product and count. Replicas are generated into a hidden packing on a random subset of the
    workers (so at least one packing exists and the optimum leaves workers empty), then shuffled into
    arrival order.
    """
    rng = np.random.default_rng(seed)
    n_workers = int(rng.integers(2, max_workers + 1))
    workers = []
    pool = PRODUCTS[int(rng.integers(len(PRODUCTS)))], int(rng.choice([1, 2, 4]))
    for w in range(n_workers):
        (product, gib), gpus = pool
        if mixed:
            product, gib = PRODUCTS[int(rng.integers(len(PRODUCTS)))]
            gpus = int(rng.choice([1, 2, 4]))
        workers.append(SmallWorker(name=f"w{w}", vram=(gib * GIB,) * gpus, ram=gpus * 64 * GIB,
                                   product=product))
    hidden = rng.permutation(n_workers)[: int(rng.integers(1, n_workers + 1))]
    free = {int(w): list(workers[w].vram) for w in hidden}
    ram = {int(w): workers[w].ram for w in hidden}
    n_replicas = int(rng.integers(5, max_replicas + 1))
    replicas: list[SmallReplica] = []
    for _ in range(20 * n_replicas):
        if len(replicas) == n_replicas:
            break
        w = int(hidden[rng.integers(len(hidden))])
        gib = workers[w].vram[0] // GIB
        if rng.random() < 0.5:  # a fractional model: 5%..60% of this GPU
            rep = SmallReplica(model="", gpus=1, vram=int(gib * rng.uniform(0.05, 0.6) + 1) * GIB,
                               ram=int(rng.integers(2, 16)) * GIB)
        else:  # an LLM on 1, 2 or 4 whole GPUs, claiming 90% of each
            rep = SmallReplica(model="", gpus=int(rng.choice([1, 1, 2, 4])), vram=int(gib * 0.9) * GIB,
                               ram=int(rng.integers(8, 48)) * GIB)
        room = [g for g, v in enumerate(free[w]) if v >= rep.vram]
        if len(room) < rep.gpus or ram[w] < rep.ram:
            continue
        for g in room[: rep.gpus]:
            free[w][g] -= rep.vram
        ram[w] -= rep.ram
        replicas.append(SmallReplica(model=f"m{len(replicas)}", gpus=rep.gpus, vram=rep.vram, ram=rep.ram))
    order = rng.permutation(len(replicas))
    return Instance(seed=seed, workers=tuple(workers), replicas=tuple(replicas[i] for i in order))


def solve(instance: Instance, time_limit_s: float = 3.0) -> Optimum | None:
    """The minimum number of workers hosting every replica (None: no packing hosts them all)."""
    model = cp_model.CpModel()
    ws, rs = instance.workers, instance.replicas
    used = [model.new_bool_var(f"u{w}") for w in range(len(ws))]
    on = [[model.new_bool_var(f"y{r}_{w}") for w in range(len(ws))] for r in range(len(rs))]
    gpu: dict[tuple[int, int, int], cp_model.IntVar] = {}
    for r, rep in enumerate(rs):
        model.add_exactly_one(on[r])
        for w, wk in enumerate(ws):
            fits = [g for g, v in enumerate(wk.vram) if v >= rep.vram]
            if len(fits) < rep.gpus:
                model.add(on[r][w] == 0)
                continue
            xs = [gpu.setdefault((r, w, g), model.new_bool_var(f"x{r}_{w}_{g}")) for g in fits]
            model.add(sum(xs) == rep.gpus * on[r][w])
            model.add_implication(on[r][w], used[w])
    for w, wk in enumerate(ws):
        model.add(sum(rep.ram * on[r][w] for r, rep in enumerate(rs)) <= wk.ram)
        loads = []
        for g, v in enumerate(wk.vram):
            load = sum(rs[r].vram * x for (r, ww, gg), x in gpu.items() if ww == w and gg == g)
            model.add(load <= v)
            loads.append(load)
        # A worker's GPUs are identical: order them by load to cut symmetric solutions.
        for g in range(len(loads) - 1):
            model.add(loads[g] >= loads[g + 1])
    for w in range(len(ws) - 1):
        if ws[w].vram == ws[w + 1].vram and ws[w].ram == ws[w + 1].ram:
            model.add(used[w] >= used[w + 1])  # identical workers: use the earlier one first
    if all(wk.vram == ws[0].vram and wk.ram == ws[0].ram for wk in ws):
        # Identical workers: number them by their lowest replica, so replica r sits on a worker <= r.
        for r in range(len(rs)):
            for w in range(r + 1, len(ws)):
                model.add(on[r][w] == 0)
    # Valid cuts that let CP-SAT prove optimality quickly: the used workers must hold the total VRAM
    # and RAM, and replicas larger than half of the largest GPU cannot share a GPU with each other.
    model.add(sum(sum(wk.vram) * used[w] for w, wk in enumerate(ws)) >= sum(r.vram * r.gpus for r in rs))
    model.add(sum(wk.ram * used[w] for w, wk in enumerate(ws)) >= sum(r.ram for r in rs))
    largest = max(v for wk in ws for v in wk.vram)
    model.add(sum(len(wk.vram) * used[w] for w, wk in enumerate(ws))
              >= sum(r.gpus for r in rs if 2 * r.vram > largest))
    model.minimize(sum(used))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status == cp_model.OPTIMAL:
        return Optimum(workers=round(solver.objective_value), proven=True)
    if status == cp_model.FEASIBLE:
        return Optimum(workers=int(np.ceil(solver.best_objective_bound - 1e-6)), proven=False)
    return None


def check(instance: Instance, placements: list[Assignment | None]) -> int:
    """Workers used by a strategy's placements, after checking they respect every capacity.

    Raises ValueError on an overcommit or a replica split across too few GPUs; a None placement
    (unplaced replica) is allowed and counts nothing.
    """
    vram = [list(w.vram) for w in instance.workers]
    ram = [w.ram for w in instance.workers]
    used: set[int] = set()
    for rep, where in zip(instance.replicas, placements, strict=True):
        if where is None:
            continue
        w, gpus = where
        if len(set(gpus)) != rep.gpus:
            raise ValueError(f"{rep.model} asked for {rep.gpus} GPUs, got {gpus}")
        for g in gpus:
            vram[w][g] -= rep.vram
            if vram[w][g] < 0:
                raise ValueError(f"{rep.model} overcommits {instance.workers[w].name}/gpu{g}")
        ram[w] -= rep.ram
        if ram[w] < 0:
            raise ValueError(f"{rep.model} overcommits RAM of {instance.workers[w].name}")
        used.add(w)
    return len(used)


def gantry_place(instance: Instance, strategy: str) -> list[Assignment | None]:
    """Place the instance's replicas one after another with the placement core's ``place()``."""
    from shared.core.placement import ClusterSnapshot, Profile, place
    from shared.core.placement.domain import (
        Category,
        Decision,
        Gpu,
        ModelSpec,
        PlacementStrategy,
        ResourceRequest,
        Worker,
    )
    from shared.core.placement.lifecycle import instance_from_decision

    from .core_policy import STRATEGY_SCORERS

    workers = [
        Worker(name=w.name, ram_total=w.ram,
               gpus=tuple(Gpu(index=g, product=w.product, vram_total=v) for g, v in enumerate(w.vram)))
        for w in instance.workers
    ]
    snap = ClusterSnapshot.from_parts(workers)
    profile = Profile(name=strategy, scorers=STRATEGY_SCORERS[strategy],
                      fit_strategies=("single_gpu", "multi_gpu"))
    placement = PlacementStrategy.SPREAD if strategy == "spread" else PlacementStrategy.BINPACK
    index = {w.name: i for i, w in enumerate(instance.workers)}
    out: list[Assignment | None] = []
    for n, rep in enumerate(instance.replicas):
        model = ModelSpec(name=rep.model, categories=(Category.EMBEDDING,), placement_strategy=placement)
        request = ResourceRequest(vram=rep.vram * rep.gpus, ram=rep.ram, gpu_count=rep.gpus, basis="instance")
        result = place(snap, model, 0.0, profile, request=request)
        if not isinstance(result, Decision):
            out.append(None)
            continue
        snap.upsert_instance(instance_from_decision(result, f"i{n}", created_at=float(n)))
        out.append((index[result.candidate.worker], result.candidate.gpu_indexes))
    return out


@dataclass(frozen=True)
class OptimalityRow:
    """One instance: the optimum and each strategy's worker count (None: left a replica unplaced)."""

    seed: int
    replicas: int
    workers: int
    optimum: int
    proven: bool
    used: dict[str, int | None]


def with_spare(instance: Instance) -> Instance:
    """The instance plus one spare worker like its first, named to sort after the others.

    The optimum never needs it (the instance was generated to fit its own workers), but an online
    strategy that cannot fit everything into the ``n`` workers may use ``n + 1``: with the spare,
    "within one worker of the optimum" is decided exactly (failing with ``n + 1`` workers means
    needing more than ``optimum + 1``).
    """
    first = instance.workers[0]
    spare = SmallWorker(name="x-spare", vram=first.vram, ram=first.ram, product=first.product)
    return Instance(seed=instance.seed, workers=(*instance.workers, spare), replicas=instance.replicas)


def evaluate(seed: int, strategies: tuple[str, ...], mixed: bool = False) -> OptimalityRow:
    """Solve one random instance and place it with every strategy.

    One worker type per instance (``mixed=False``): strategies get one spare worker (``with_spare``).
    Mixed worker types: no spare (a spare of one type could beat the optimum over the given workers),
    so an unplaced replica counts as a miss.
    """
    instance = random_instance(seed, mixed=mixed)
    best = solve(instance)
    if best is None:
        raise RuntimeError(f"instance {seed} has no packing, but it was generated from one")
    offered = instance if mixed else with_spare(instance)
    used: dict[str, int | None] = {}
    for strategy in strategies:
        placements = gantry_place(offered, strategy)
        count = check(offered, placements)
        used[strategy] = count if all(p is not None for p in placements) else None
    return OptimalityRow(seed=seed, replicas=len(instance.replicas), workers=len(instance.workers),
                         optimum=best.workers, proven=best.proven, used=used)
