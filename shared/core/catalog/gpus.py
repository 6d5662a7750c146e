"""GPU hardware facts (memory, bandwidth, peak throughput) from the merged spec table."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

GIB = 1 << 30


class GpuSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU model's datasheet numbers."""

    key: str
    name: str
    mem_bytes: int
    mem_bw_bytes_s: float
    bf16_flops: float  # dense tensor-core peak, FLOP/s
    fp8_flops: float | None
    intra_node_bw_bytes_s: float | None  # per GPU, unidirectional (NVLink or PCIe)
    source: str = ""


def _float(row: Mapping[str, str], col: str) -> float | None:
    value = (row.get(col) or "").strip()
    return float(value) if value else None


def gpu_spec_from_row(row: Mapping[str, str]) -> GpuSpec:
    """Parse one row of ``gpu_specs.csv`` into SI units."""
    mem_gib = _float(row, "mem_gib") or 0.0
    bw = _float(row, "mem_bw_GBps") or 0.0
    bf16 = _float(row, "bf16_dense_tflops") or 0.0
    fp8 = _float(row, "fp8_dense_tflops")
    nvlink = _float(row, "intra_node_bw_GBps_per_gpu")
    return GpuSpec(
        key=row["gpu_key"],
        name=row["gpu_name"],
        mem_bytes=int(mem_gib * GIB),
        mem_bw_bytes_s=bw * 1e9,
        bf16_flops=bf16 * 1e12,
        fp8_flops=fp8 * 1e12 if fp8 is not None else None,
        intra_node_bw_bytes_s=nvlink * 1e9 if nvlink is not None else None,
        source=row.get("source", ""),
    )
