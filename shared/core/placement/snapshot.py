"""The in-memory cluster snapshot that placement reads, updated incrementally from events.

Services keep one snapshot per process and apply heartbeats, instance changes and model-file readiness
as they arrive; nothing is reloaded per decision. Besides the plain records, the snapshot keeps
row-per-worker numpy columns (heartbeat, RAM allocatable, and a ``[worker, gpu slot]`` matrix of
allocatable VRAM, totals, types and instance counts) so the fast path can judge 8,000 GPUs with a
handful of vectorised operations. Every mutation refreshes the touched worker's row only.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.limits import MAX_FILES_PER_WORKER, MAX_GPU_KINDS_PER_WORKER
from shared.core.placement.domain import (
    Instance,
    ModelFile,
    ModelFileState,
    Worker,
    WorkerState,
)
from shared.core.placement.lifecycle import worker_state

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
CPU_UNCHECKED = 1 << 62  # allocatable milli-cores of a worker that reports no CPU count: never short
PlacedKey = tuple[float, str, int]  # (created_at, instance id, record serial)


class SnapshotConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Liveness thresholds and reserves the snapshot applies when deriving state."""

    heartbeat_interval: float = 5.0
    not_ready_after: float = 15.0  # heartbeat age (seconds) from which a worker is NOT_READY
    vram_reserve: int = 0  # bytes kept free on every GPU
    ram_reserve: int = 0  # bytes kept free on every worker


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU as placement sees it: reported facts plus derived allocatable VRAM."""

    index: int
    slot: int
    vendor: str
    product: str
    total: int
    allocatable: int
    schedulable: bool
    labels: dict[str, str]

    @property
    def type_key(self) -> tuple[str, str]:
        """GPUs of different types are never mixed in one candidate."""
        return (self.vendor, self.product)


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as placement sees it (reference path)."""

    name: str
    worker: Worker
    ram_allocatable: int
    gpus: tuple[GpuView, ...]
    cpu_allocatable: int = CPU_UNCHECKED  # milli-cores


def _ndarray(shape: tuple[int, ...], dtype: type, fill: object = 0) -> npt.NDArray[np.generic]:
    return np.full(shape, fill, dtype=dtype)


CODES_SLACK = 4096  # codes past what the present workers can use before the tables are renumbered
SHARED_VENDOR_BIT = 62  # vendors past the first 62 seen share this bit of the int64 vendor mask


def vendor_bit(code: int) -> int:
    """The bit of vendor code ``code``: its own for the first ``SHARED_VENDOR_BIT`` vendors, then a shared one. (A
    bit per code overflowed the int64 column at the 64th vendor: one registration naming 64 vendors made every
    snapshot fail to add any worker with a new vendor, and every service fail at start.)"""
    return min(code, SHARED_VENDOR_BIT)


class ClusterSnapshot:
    """Workers, instances and model-file readiness, with derived allocatable resources.

    Pure and clock-free: liveness is judged against the ``now`` each query passes in.
    """

    # Columns by worker row (and GPU slot); read by the fast path, written only by ``_refresh``.
    w_present: BoolArray
    w_heartbeat: FloatArray
    w_cordoned: BoolArray
    w_cluster: IntArray
    w_ram_alloc: IntArray
    w_cpu_alloc: IntArray  # milli-cores; CPU_UNCHECKED where the worker reports no CPU count
    w_gpus: IntArray
    w_vendor_bits: IntArray
    w_instances: IntArray
    w_rank: IntArray
    w_vram_total: IntArray  # sum of the row's GPU totals
    w_vram_free: IntArray  # sum of the row's GPU allocatable, each clamped to [0, total]
    w_stamp: IntArray  # the snapshot version at the row's last recompute: values derived from a row stay valid
    g_exists: BoolArray
    g_ok: BoolArray
    g_index: IntArray
    g_total: IntArray
    g_alloc: IntArray
    g_type: IntArray
    g_instances: IntArray
    g_labelled: BoolArray

    def __init__(self, config: SnapshotConfig | None = None) -> None:
        self.config = config or SnapshotConfig()
        self.version = 0  # bumped by every mutation
        # While instance changes are applied as a batch (``batched``): workers whose usage columns are yet to
        # be recomputed, with the version of their last change.
        self._deferred: dict[str, int] | None = None
        self.layout = 0  # bumped whenever rows or slots move (positions computed before are stale)
        self._rows_cache: dict[tuple[str, ...], IntArray] = {}
        self._workers: dict[str, Worker] = {}
        self._row: dict[str, int] = {}
        self._names: list[str] = []
        self._by_name: tuple[IntArray, npt.NDArray[np.object_]] | None = None  # rows in name order, names
        self._free: list[int] = []
        self._slot: dict[str, dict[int, int]] = {}
        self._instances: dict[str, Instance] = {}
        # (created_at, id, serial) of every instance on a worker, oldest first: "the most recent placements"
        # in O(window) instead of a sort of every instance per decision (the fragmentation scorer's
        # workload). Each new record of an instance's claims gets a new serial, so two equal windows of keys
        # hold the same records: a consumer can keep what it derived from a window until the keys change.
        self._placed: list[PlacedKey] = []
        self._placed_key: dict[str, PlacedKey] = {}
        self._placed_serial = 0
        # Derived values a plugin may keep between decisions (e.g. replica shapes); dropped whenever a
        # worker's inventory may have changed, since such values may read GPU totals.
        self.memo: dict[str, Any] = {}
        self._by_model: dict[str, dict[str, Instance]] = {}
        self._vram_claims: dict[str, dict[int, int]] = {}
        self._ram_claims: dict[str, int] = {}
        self._cpu_claims: dict[str, int] = {}
        self._model_worker_count: dict[str, dict[str, int]] = {}
        self._model_gpu_count: dict[str, dict[tuple[str, int], int]] = {}
        self._worker_total: dict[str, int] = {}
        self._gpu_total: dict[tuple[str, int], int] = {}
        self._files: dict[str, dict[str, ModelFile]] = {}
        self._file_count: dict[str, int] = {}  # worker -> sources in _files it has files of
        self._codes: dict[str, dict[str, int]] = {"cluster": {}, "vendor": {}, "type": {}}
        self._type_names: list[tuple[str, str]] = []
        self._rank_dirty = True
        self._claim_cache: dict[float, IntArray] = {}
        self._count_cache: dict[str, tuple[IntArray, IntArray]] = {}  # per model, updated in place
        self._ready_cache: dict[str, BoolArray] = {}  # per model source
        self._cap = 0
        self._gmax = 0
        self._alloc_arrays(16, 8)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_parts(
        cls,
        workers: Iterable[Worker] = (),
        instances: Iterable[Instance] = (),
        model_files: Iterable[ModelFile] = (),
        config: SnapshotConfig | None = None,
    ) -> ClusterSnapshot:
        """A snapshot holding the given records."""
        snap = cls(config)
        for worker in workers:
            snap.upsert_worker(worker)
        for instance in instances:
            snap.upsert_instance(instance)
        for model_file in model_files:
            snap.set_model_file(model_file)
        return snap

    def _alloc_arrays(self, cap: int, gmax: int) -> None:
        old_cap, old_g = self._cap, self._gmax
        rows, cols = min(old_cap, cap), min(old_g, gmax)

        def grow1(name: str, dtype: type, fill: object = 0) -> None:
            new = _ndarray((cap,), dtype, fill)
            if old_cap:
                new[:rows] = getattr(self, name)[:rows]
            setattr(self, name, new)

        def grow2(name: str, dtype: type, fill: object = 0) -> None:
            new = _ndarray((cap, gmax), dtype, fill)
            if old_cap:
                new[:rows, :cols] = getattr(self, name)[:rows, :cols]
            setattr(self, name, new)

        grow1("w_present", np.bool_, False)
        grow1("w_heartbeat", np.float64, 0.0)
        grow1("w_cordoned", np.bool_, False)
        grow1("w_cluster", np.int64, -1)
        grow1("w_ram_alloc", np.int64, 0)
        grow1("w_cpu_alloc", np.int64, CPU_UNCHECKED)
        grow1("w_gpus", np.int64, 0)
        grow1("w_vendor_bits", np.int64, 0)
        grow1("w_instances", np.int64, 0)
        grow1("w_rank", np.int64, 0)
        grow1("w_vram_total", np.int64, 0)
        grow1("w_vram_free", np.int64, 0)
        grow1("w_stamp", np.int64, -1)
        grow2("g_exists", np.bool_, False)
        grow2("g_ok", np.bool_, False)  # exists and schedulable
        grow2("g_index", np.int64, -1)
        grow2("g_total", np.int64, 0)
        grow2("g_alloc", np.int64, 0)
        grow2("g_type", np.int64, -1)
        grow2("g_instances", np.int64, 0)
        grow2("g_labelled", np.bool_, False)
        self._cap, self._gmax = cap, gmax
        self._count_cache.clear()
        self._moved()

    def vendor_bit(self, vendor: str) -> int | None:
        """The bit of ``vendor`` in ``w_vendor_bits`` (None: never seen); ``SHARED_VENDOR_BIT`` is shared by every
        vendor past the first ones, and a test on it is only a first cut (``backend-filter`` then checks exactly)."""
        code = self._codes["vendor"].get(vendor)
        return None if code is None else vendor_bit(code)

    def _code(self, kind: str, value: str) -> int:
        codes = self._codes[kind]
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
        return code

    def _type_code(self, vendor: str, product: str) -> int:
        key = f"{vendor}\x00{product}"
        known = len(self._codes["type"])
        code = self._code("type", key)
        if code == known:
            self._type_names.append((vendor, product))
        return code

    # ---------------------------------------------------------------- workers

    def upsert_worker(self, worker: Worker) -> None:
        """Add a worker or replace it with its latest heartbeat."""
        self.version += 1
        name = worker.name
        new_slots = {gpu.index: slot for slot, gpu in enumerate(worker.gpus)}
        if name not in self._row or self._slot.get(name) != new_slots:
            self._count_cache.clear()  # rows or slots move: per-model columns are rebuilt on demand
            self._ready_cache.clear()
            self._moved()
        if name not in self._row:
            if self._free:
                row = self._free.pop()
                self._names[row] = name
            else:
                row = len(self._names)
                self._names.append(name)
            if row >= self._cap:
                self._alloc_arrays(max(16, self._cap * 2), self._gmax)
            self._row[name] = row
            self._rank_dirty = True
            self._moved()
        if len(worker.gpus) > self._gmax:
            self._alloc_arrays(self._cap, len(worker.gpus))
        self._workers[name] = worker
        self._claim_cache.clear()  # totals may have changed
        self.memo.clear()
        self._slot[name] = new_slots
        self._refresh(name)
        rows = len(self._row)
        if (len(self._codes["type"]) > CODES_SLACK + MAX_GPU_KINDS_PER_WORKER * rows
                or len(self._codes["cluster"]) > CODES_SLACK + rows):
            self._compact_codes()

    def _compact_codes(self) -> None:
        """Forget the cluster, vendor and GPU-kind codes no present worker uses (every row renumbered): interned for
        good, they grew with each re-registration naming new ones (20,000 of one worker: 70 MiB in every service,
        and every GPU-type match scanned them all). Codes live only within one call, so renumbering between calls
        is safe."""
        self._codes = {kind: {} for kind in self._codes}
        self._type_names = []
        self.g_type[:, :] = -1
        for name in list(self._row):
            self._refresh(name)
        self._count_cache.clear()
        self.memo.clear()
        self._moved()

    def touch(self, name: str, last_heartbeat: float) -> None:
        """A heartbeat that changed nothing but the time: only liveness moves (no row recompute)."""
        worker = self._workers.get(name)
        row = self._row.get(name)
        if worker is None or row is None:
            return
        self.version += 1
        self._workers[name] = msgspec.structs.replace(worker, last_heartbeat=last_heartbeat)
        self.w_heartbeat[row] = last_heartbeat

    def remove_worker(self, name: str) -> None:
        """Forget a worker (its instances' records stay until they are removed)."""
        row = self._row.pop(name, None)
        if row is None:
            return
        self.version += 1
        del self._workers[name]
        del self._slot[name]
        self._names[row] = ""
        self._free.append(row)
        self._claim_cache.clear()
        self.memo.clear()
        self._count_cache.clear()
        self._ready_cache.clear()
        self._moved()
        self.w_present[row] = False
        self.w_stamp[row] = self.version
        self.w_vram_total[row] = 0
        self.w_vram_free[row] = 0
        self.g_exists[row, :] = False
        self.g_ok[row, :] = False
        self._rank_dirty = True

    def update_usage(self, worker: Worker) -> None:
        """Replace a known worker's record after a heartbeat that moved only its usage (VRAM and RAM in use,
        time): its inventory, labels and cordons are as before, so only the usage columns are recomputed.
        An unknown worker is added whole."""
        name = worker.name
        if name not in self._row:
            self.upsert_worker(worker)
            return
        self.version += 1
        self._workers[name] = worker
        self._refresh_usage(name)

    def _refresh(self, name: str) -> None:
        """Recompute one worker's row of derived columns from its records."""
        row = self._row.get(name)
        if row is None:
            return
        worker = self._workers[name]
        bits = 0
        total = 0
        for slot, gpu in enumerate(worker.gpus):
            bits |= 1 << vendor_bit(self._code("vendor", gpu.vendor))
            total += gpu.vram_total
            self.g_exists[row, slot] = True
            self.g_ok[row, slot] = gpu.schedulable
            self.g_index[row, slot] = gpu.index
            self.g_total[row, slot] = gpu.vram_total
            self.g_type[row, slot] = self._type_code(gpu.vendor, gpu.product)
            self.g_labelled[row, slot] = bool(gpu.labels)
        self.w_present[row] = True
        self.w_cordoned[row] = worker.cordoned
        self.w_cluster[row] = self._code("cluster", worker.cluster)
        self.w_gpus[row] = len(worker.gpus)
        self.w_vram_total[row] = total
        n = len(worker.gpus)
        self.g_exists[row, n:] = False
        self.g_ok[row, n:] = False
        self.g_index[row, n:] = -1
        self.w_vendor_bits[row] = bits
        self._refresh_usage(name)

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Apply several instance changes, recomputing each touched worker's usage columns once at the end
        instead of after every change: the same values and stamps (each worker's as of its last change), for a
        fraction of the work when many changes land on few workers. Nothing may read the snapshot meanwhile."""
        if self._deferred is not None:  # already batching
            yield
            return
        self._deferred = {}
        try:
            yield
        finally:
            pending, self._deferred = self._deferred, None
            for name, version in pending.items():
                self._refresh_usage(name, version)

    def _refresh_instances_usage(self, names: Iterable[str]) -> None:
        """The usage columns of workers an instance change touched: now, or at the end of the batch."""
        if self._deferred is None:
            for name in names:
                self._refresh_usage(name)
        else:
            for name in names:
                self._deferred[name] = self.version

    def _refresh_usage(self, name: str, stamp: int | None = None) -> None:
        """Recompute the columns that claims, counts and reported usage move (most events change only
        these: an instance placed or gone, a heartbeat), each GPU column as one row slice; the row is stamped
        with ``stamp`` (the current version when None)."""
        row = self._row.get(name)
        if row is None:
            return
        worker = self._workers[name]
        gpus = worker.gpus
        claims = self._vram_claims.get(name, {})
        reserve = self.config.vram_reserve
        counted = self._gpu_total.get
        # One pass per GPU, without min()/max() calls: this runs on every placement, release and usage change
        # in each service that follows claims. alloc = total − max(claim, used) − reserve; free adds the
        # allocatable VRAM clamped to [0, total].
        alloc: list[int] = []
        counts: list[int] = []
        free = 0
        for gpu in gpus:
            total, used, claim = gpu.vram_total, gpu.vram_used, claims.get(gpu.index, 0)
            a = total - (claim if claim > used else used) - reserve
            alloc.append(a)
            counts.append(counted((name, gpu.index), 0))
            a = a if a > 0 else 0
            free += a if a < total else total
        n = len(gpus)
        self.g_alloc[row, :n] = alloc
        self.g_instances[row, :n] = counts
        self.w_heartbeat[row] = worker.last_heartbeat
        self.w_ram_alloc[row] = self.ram_allocatable_of(worker)
        self.w_cpu_alloc[row] = self.cpu_allocatable_of(worker)
        self.w_instances[row] = self._worker_total.get(name, 0)
        self.w_vram_free[row] = free
        self.w_stamp[row] = self.version if stamp is None else stamp

    def ram_allocatable_of(self, worker: Worker) -> int:
        """RAM total − max(Gantry claims, reported use) − reserve: external use counts, never below 0."""
        claim = self._ram_claims.get(worker.name, 0)
        return worker.ram_total - max(claim, worker.ram_used) - self.config.ram_reserve

    def cpu_allocatable_of(self, worker: Worker) -> int:
        """CPU total − max(Gantry claims, reported use), in milli-cores; CPU_UNCHECKED when not reported."""
        if worker.cpu_total <= 0:
            return CPU_UNCHECKED
        return worker.cpu_total - max(self._cpu_claims.get(worker.name, 0), worker.cpu_used)

    # ---------------------------------------------------------------- instances

    def upsert_instance(self, instance: Instance) -> None:
        """Add an instance or replace it (e.g. a state change); claims and counts follow."""
        self.version += 1
        old = self._instances.get(instance.id)
        same_parts = old is not None and self._parts(old) == self._parts(instance)
        if not same_parts or old is None or old.created_at != instance.created_at:
            self._track_placed(instance.id, instance)
        if old is not None and old.model == instance.model and same_parts:
            # A state change (STARTING → RUNNING): same claims and counts, nothing to recompute.
            self._instances[instance.id] = instance
            self._by_model[instance.model][instance.id] = instance
            return
        touched: set[str] = set()
        if old is not None:
            touched |= self._apply(old, -1)
        self._instances[instance.id] = instance
        self._by_model.setdefault(instance.model, {})[instance.id] = instance
        touched |= self._apply(instance, +1)
        self._refresh_instances_usage(touched)

    def _track_placed(self, instance_id: str, new: Instance | None) -> None:
        """Drop the instance's entry in the creation-ordered list; a new entry (a new serial) for ``new``."""
        old_key = self._placed_key.pop(instance_id, None)
        if old_key is not None:
            i = bisect_left(self._placed, old_key)
            if i < len(self._placed) and self._placed[i] == old_key:
                del self._placed[i]
        if new is not None and new.worker is not None:
            self._placed_serial += 1
            key = (new.created_at, instance_id, self._placed_serial)
            self._placed_key[instance_id] = key
            insort(self._placed, key)

    def recent_placed(self, window: int) -> list[Instance]:
        """The ``window`` most recently created instances that sit on a worker, oldest first."""
        return [self._instances[i] for _, i, _ in self.placed_window(window)]

    def placed_window(self, window: int) -> list[PlacedKey]:
        """Keys of the ``window`` most recently created instances on a worker, oldest first.

        Equal lists mean the same instance records (a record whose claims changed has a new key), so a
        value derived from a window's records may be kept until this list changes.
        """
        if window <= 0:
            return []
        return self._placed[-window:]

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance and release its claims."""
        old = self._instances.pop(instance_id, None)
        if old is None:
            return
        self.version += 1
        self._track_placed(instance_id, None)
        by_model = self._by_model.get(old.model, {})
        by_model.pop(instance_id, None)
        if not by_model:
            self._by_model.pop(old.model, None)
        self._refresh_instances_usage(self._apply(old, -1))

    @staticmethod
    def _parts(instance: Instance) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int, int]]:
        parts = []
        if instance.worker:
            parts.append((instance.worker, instance.gpu_indexes, instance.vram_claims, instance.ram_claim,
                          instance.cpu_claim))
        for sub in instance.subordinates:
            parts.append((sub.worker, sub.gpu_indexes, sub.vram_claims, sub.ram_claim, sub.cpu_claim))
        return parts

    def _apply(self, instance: Instance, sign: int) -> set[str]:
        """Add (+1) or remove (−1) an instance's claims and counts; returns the workers touched."""
        touched: set[str] = set()
        model_workers = self._model_worker_count.setdefault(instance.model, {})
        model_gpus = self._model_gpu_count.setdefault(instance.model, {})
        for worker, indexes, claims, ram, cpu in self._parts(instance):
            vram = self._vram_claims.setdefault(worker, {})
            for index, claim in zip(indexes, claims, strict=False):
                vram[index] = vram.get(index, 0) + sign * claim
            self._ram_claims[worker] = self._ram_claims.get(worker, 0) + sign * ram
            if cpu:
                self._cpu_claims[worker] = self._cpu_claims.get(worker, 0) + sign * cpu
            cached = self._count_cache.get(instance.model)
            row = self._row.get(worker)
            if worker not in touched:
                _bump(model_workers, worker, sign)
                _bump(self._worker_total, worker, sign)
                if cached is not None and row is not None:
                    cached[0][row] += sign
            for index in set(indexes):
                _bump(model_gpus, (worker, index), sign)
                _bump(self._gpu_total, (worker, index), sign)
                slot = self._slot.get(worker, {}).get(index)
                if cached is not None and row is not None and slot is not None:
                    cached[1][row, slot] += sign
            touched.add(worker)
        return touched

    # ---------------------------------------------------------------- model files

    def set_model_file(self, model_file: ModelFile) -> bool:
        """Record the readiness of a model source's files on one worker; False (nothing recorded) for a new source
        of a worker that has ``MAX_FILES_PER_WORKER`` already (each is kept until it is removed)."""
        source, worker = model_file.source, model_file.worker
        per = self._files.setdefault(source, {})
        if worker not in per:
            held = self._file_count.get(worker, 0)
            if held >= MAX_FILES_PER_WORKER:
                if not per:
                    del self._files[source]
                return False
            self._file_count[worker] = held + 1
        self.version += 1
        per[worker] = model_file
        self._ready_changed(source, worker, model_file.state == ModelFileState.READY)
        return True

    def remove_model_file(self, source: str, worker: str) -> None:
        """Forget a model source's files on one worker."""
        self.version += 1
        per = self._files.get(source, {})
        if per.pop(worker, None) is not None:
            self._file_count[worker] -= 1
            if not self._file_count[worker]:
                del self._file_count[worker]
            if not per:
                del self._files[source]
        self._ready_changed(source, worker, False)

    def _ready_changed(self, source: str, worker: str, ready: bool) -> None:
        """Keep ``ready_file_rows``' flags for ``source`` current: one flag set in place (every placement moves
        a model's files somewhere, and rebuilding the column from every record cost more than scoring it)."""
        cached = self._ready_cache.get(source)
        row = self._row.get(worker)
        if cached is not None and row is not None and cached.shape[0] == len(self._names):
            cached[row] = ready
        else:
            self._ready_cache.pop(source, None)

    def model_file_ready(self, source: str, worker: str) -> bool:
        """Whether ``source``'s files are READY on ``worker``."""
        record = self._files.get(source, {}).get(worker)
        return record is not None and record.state == ModelFileState.READY

    def ready_file_workers(self, source: str) -> list[str]:
        """Workers on which ``source``'s files are READY."""
        return [w for w, f in self._files.get(source, {}).items() if f.state == ModelFileState.READY]

    def model_files(self) -> list[ModelFile]:
        """Every readiness record."""
        return [f for per in self._files.values() for f in per.values()]

    # ---------------------------------------------------------------- queries

    def worker(self, name: str) -> Worker | None:
        """The worker's latest record."""
        return self._workers.get(name)

    def worker_names(self) -> list[str]:
        """Every worker name, sorted."""
        return sorted(self._workers)

    def __len__(self) -> int:
        return len(self._workers)

    def state(self, name: str, now: float) -> WorkerState:
        """READY / NOT_READY / MAINTENANCE from the heartbeat age at ``now`` and the cordon flag."""
        worker = self._workers.get(name)
        if worker is None:
            return WorkerState.NOT_READY
        return worker_state(worker.cordoned, worker.last_heartbeat, now, self.config.not_ready_after)

    def instance(self, instance_id: str) -> Instance | None:
        """An instance by id."""
        return self._instances.get(instance_id)

    def instances(self, model: str | None = None) -> list[Instance]:
        """Instances (of one model), sorted by id."""
        if model is None:
            return sorted(self._instances.values(), key=lambda i: i.id)
        return sorted(self._by_model.get(model, {}).values(), key=lambda i: i.id)

    def gpu_claimed(self, name: str, index: int) -> int:
        """VRAM Gantry instances claim on one GPU."""
        return self._vram_claims.get(name, {}).get(index, 0)

    def ram_claimed(self, name: str) -> int:
        """RAM Gantry instances claim on one worker."""
        return self._ram_claims.get(name, 0)

    def gpu_allocatable(self, name: str, index: int) -> int:
        """Allocatable VRAM of one GPU: total − claims − external use − reserve (may be negative)."""
        row, slot = self._row[name], self._slot[name][index]
        return int(self.g_alloc[row, slot])

    def ram_allocatable(self, name: str) -> int:
        """Allocatable RAM of one worker."""
        return int(self.w_ram_alloc[self._row[name]])

    def cpu_allocatable(self, name: str) -> int:
        """Allocatable milli-cores of one worker (CPU_UNCHECKED when it reports no CPU count)."""
        return int(self.w_cpu_alloc[self._row[name]])

    def cpu_claimed(self, name: str) -> int:
        """Milli-cores Gantry instances claim on one worker."""
        return self._cpu_claims.get(name, 0)

    def worker_counts(self, model: str, name: str) -> tuple[int, int]:
        """(instances of ``model``, instances of other models) on a worker."""
        current = self._model_worker_count.get(model, {}).get(name, 0)
        return current, self._worker_total.get(name, 0) - current

    def gpu_counts(self, model: str, name: str, index: int) -> tuple[int, int]:
        """(instances of ``model``, instances of other models) on one GPU."""
        current = self._model_gpu_count.get(model, {}).get((name, index), 0)
        return current, self._gpu_total.get((name, index), 0) - current

    def model_gpus(self, model: str) -> set[tuple[str, int]]:
        """GPUs (worker, index) that instances of ``model`` already hold."""
        return {key for key, n in self._model_gpu_count.get(model, {}).items() if n > 0}

    def view(self, name: str) -> WorkerView:
        """A worker with its GPUs' allocatable VRAM, for the reference path and explanations."""
        worker = self._workers[name]
        row = self._row[name]
        gpus = tuple(
            GpuView(
                index=gpu.index,
                slot=slot,
                vendor=gpu.vendor,
                product=gpu.product,
                total=gpu.vram_total,
                allocatable=int(self.g_alloc[row, slot]),
                schedulable=gpu.schedulable,
                labels=gpu.labels,
            )
            for slot, gpu in enumerate(worker.gpus)
        )
        return WorkerView(name=name, worker=worker, ram_allocatable=int(self.w_ram_alloc[row]), gpus=gpus,
                          cpu_allocatable=int(self.w_cpu_alloc[row]))

    # ---------------------------------------------------------------- fast-path support

    @property
    def rows(self) -> int:
        """Rows in use (including freed ones, which are not present)."""
        return len(self._names)

    def row_of(self, name: str) -> int | None:
        """The column row of a worker."""
        return self._row.get(name)

    def slot_map(self, name: str) -> dict[int, int] | None:
        """GPU index → column slot for one worker."""
        return self._slot.get(name)

    def name_of(self, row: int) -> str:
        """The worker name of a row."""
        return self._names[row]

    def code(self, kind: str, value: str) -> int | None:
        """The integer code of a cluster / vendor / GPU type key, or None if never seen."""
        return self._codes[kind].get(value)

    def type_names(self) -> list[tuple[str, str]]:
        """(vendor, product) of every GPU type code, by code."""
        return list(self._type_names)

    def _moved(self) -> None:
        self.layout += 1
        self._rows_cache.clear()
        self._by_name = None

    def rows_of(self, names: tuple[str, ...]) -> IntArray:
        """The row of each named worker (-1 if unknown here).

        Survivor and candidate lists are cluster-sized and repeat from one decision to the next, so the
        lookups are remembered until rows move.
        """
        rows = self._rows_cache.get(names)
        if rows is None:
            get = self._row.get
            rows = np.fromiter((get(n, -1) for n in names), dtype=np.int64, count=len(names))
            if len(self._rows_cache) >= 64:
                self._rows_cache.clear()
            self._rows_cache[names] = rows
        return rows

    def names_of(self, rows: IntArray) -> list[str]:
        """The worker name of each row."""
        return self._name_order()[1][rows].tolist()  # type: ignore[no-any-return]

    def _name_order(self) -> tuple[IntArray, npt.NDArray[np.object_]]:
        if self._by_name is None:
            order = np.array(sorted(range(len(self._names)), key=self._names.__getitem__), dtype=np.int64)
            order.flags.writeable = False
            self._by_name = (order, np.array(self._names, dtype=object))
        return self._by_name

    def name_order(self) -> IntArray:
        """Every row (freed ones too, named "") in worker-name order: read-only, kept until rows move."""
        return self._name_order()[0]

    def names_where(self, mask: BoolArray) -> list[str]:
        """Names of the rows set in ``mask``, sorted (one vectorised pass: filters hand on thousands)."""
        order, names = self._name_order()
        order = order[order < len(mask)]
        return names[order[mask[order]]].tolist()  # type: ignore[no-any-return]

    def ranks(self) -> IntArray:
        """Each row's position in name order (for deterministic tie-breaks)."""
        if self._rank_dirty:
            order = sorted(range(len(self._names)), key=self._names.__getitem__)
            ranks = np.empty(len(self._names), dtype=np.int64)
            ranks[order] = np.arange(len(order), dtype=np.int64)
            self.w_rank[: len(order)] = ranks
            self._rank_dirty = False
        return self.w_rank[: len(self._names)]

    def claim_column(self, utilization: float) -> IntArray:
        """``floor(utilization × total)`` per [row, slot] (cached until a worker changes)."""
        cached = self._claim_cache.get(utilization)
        if cached is None or cached.shape[0] != len(self._names):
            cached = (self.g_total[: len(self._names)] * utilization).astype(np.int64)
            cached.flags.writeable = False  # shared by every decision until a worker changes
            self._claim_cache[utilization] = cached
        return cached

    def model_count_columns(self, model: str) -> tuple[IntArray, IntArray]:
        """Per-row and per-[row, slot] instance counts of ``model``: read-only, kept up to date in place."""
        cached = self._count_cache.get(model)
        if cached is not None and cached[0].shape[0] == len(self._names) and cached[1].shape[1] == self._gmax:
            return cached
        built = self._build_counts(model)
        self._count_cache[model] = built
        return built

    def _build_counts(self, model: str) -> tuple[IntArray, IntArray]:
        n = len(self._names)
        per_worker = np.zeros(n, dtype=np.int64)
        per_gpu = np.zeros((n, self._gmax), dtype=np.int64)
        for name, count in self._model_worker_count.get(model, {}).items():
            row = self._row.get(name)
            if row is not None and count:
                per_worker[row] = count
        for (name, index), count in self._model_gpu_count.get(model, {}).items():
            row = self._row.get(name)
            slot = self._slot.get(name, {}).get(index)
            if row is not None and slot is not None and count:
                per_gpu[row, slot] = count
        return per_worker, per_gpu

    def ready_file_rows(self, source: str) -> BoolArray:
        """Per-row flag: ``source``'s files are READY there (read-only: kept, and updated in place as the records
        change; callers use it at once)."""
        cached = self._ready_cache.get(source)
        if cached is not None and cached.shape[0] == len(self._names):
            return cached
        flags = np.zeros(len(self._names), dtype=np.bool_)
        for name in self.ready_file_workers(source):
            row = self._row.get(name)
            if row is not None:
                flags[row] = True
        self._ready_cache[source] = flags
        return flags


def _bump(counts: dict[str, int] | dict[tuple[str, int], int], key: object, delta: int) -> None:
    store: dict[object, int] = counts  # type: ignore[assignment]
    value = store.get(key, 0) + delta
    if value:
        store[key] = value
    else:
        store.pop(key, None)
