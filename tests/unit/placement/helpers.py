"""Small builders for placement tests: workers, GPUs, models and snapshots in GiB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import (
    GIB,
    Gpu,
    Instance,
    InstanceState,
    ModelSpec,
    ResourceRequest,
    Worker,
)
from shared.core.placement.profile import DEFAULT_PROFILE, Profile
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig

NOW = 1000.0


def gpu(index: int, total: float = 80, used: float = 0, **kw: object) -> Gpu:
    """A GPU with sizes in GiB."""
    kw.setdefault("product", "H100-SXM-80GB")
    return Gpu(index=index, vram_total=int(total * GIB), vram_used=int(used * GIB), **kw)  # type: ignore[arg-type]


def worker(name: str, gpus: int | list[Gpu] = 2, ram: float = 512, ram_used: float = 0, **kw: object) -> Worker:
    """A READY worker (heartbeat at NOW) with ``gpus`` H100s or the given GPUs."""
    devices = tuple(gpu(i) for i in range(gpus)) if isinstance(gpus, int) else tuple(gpus)
    kw.setdefault("last_heartbeat", NOW)
    return Worker(name=name, gpus=devices, ram_total=int(ram * GIB), ram_used=int(ram_used * GIB), **kw)  # type: ignore[arg-type]


def instance(iid: str, model: str, worker_name: str, gpus: tuple[int, ...], claim: float = 72,
             state: InstanceState = InstanceState.RUNNING, **kw: object) -> Instance:
    """An instance holding ``claim`` GiB on each of ``gpus``."""
    return Instance(id=iid, model=model, state=state, worker=worker_name, gpu_indexes=gpus,
                    vram_claims=tuple(int(claim * GIB) for _ in gpus), **kw)  # type: ignore[arg-type]


def snapshot(*workers: Worker, instances: tuple[Instance, ...] = (), config: SnapshotConfig | None = None
             ) -> ClusterSnapshot:
    """A snapshot of the given records."""
    return ClusterSnapshot.from_parts(workers, instances, (), config)


def request(vram: float, u: float = 0.0, count: int | None = None, ram: float = 0, **kw: object) -> ResourceRequest:
    """A resource request with sizes in GiB."""
    return ResourceRequest(vram=int(vram * GIB), ram=int(ram * GIB), gpu_memory_utilization=u, gpu_count=count,
                           **kw)  # type: ignore[arg-type]


def ctx(snap: ClusterSnapshot, model: ModelSpec | None = None, req: ResourceRequest | None = None,
        profile: Profile = DEFAULT_PROFILE, now: float = NOW) -> PlacementContext:
    """A placement context."""
    return PlacementContext(snapshot=snap, model=model or ModelSpec(name="m"), profile=profile, now=now, request=req)


def write_gguf(path: Path, layers: int, layer_shape: tuple[int, int], dtype: type = np.float16,
               other_shape: tuple[int, int] = (100, 64), embed: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """A real (tiny) GGUF file: a llama header and one tensor per layer plus one non-layer tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(embed)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros(layer_shape, dtype=dtype))
    writer.add_tensor("token_embd.weight", np.zeros(other_shape, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
