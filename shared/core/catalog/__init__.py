"""Facts about model architectures and GPUs, as plain typed values.

This package is pure: it parses mappings that the caller has read. Loading the reference files from
``../shared/data`` (with caching and friendly-name lookup) lives in :mod:`shared.catalog`.
"""

from shared.core.catalog.gpus import GpuSpec, gpu_spec_from_row
from shared.core.catalog.models import DTYPE_BYTES, ModelArch, arch_from_config

__all__ = ["DTYPE_BYTES", "GpuSpec", "ModelArch", "arch_from_config", "gpu_spec_from_row"]
