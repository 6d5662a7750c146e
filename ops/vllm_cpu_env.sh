#!/usr/bin/env bash
# A CPU-only virtualenv holding vLLM's real v1 scheduler, for the differential harness
# (`gantry engine diff-vllm`, tests/unit/engine/test_differential.py). Not a Gantry dependency, not in CI.
#
# vLLM's wheel pins a CUDA torch and GPU kernels (nvidia-*, flashinfer, triton...). The scheduler needs none
# of them: it imports torch only for dtypes and config classes, and never loads vLLM's compiled extensions.
# So this installs a CPU torch, vLLM itself with --no-deps, and only the Python packages on the import path
# of the scheduler and of the model-config check (each at the version vLLM declares), then refuses any CUDA
# package that slipped in.
#
# Usage: bash ops/vllm_cpu_env.sh [VENV_DIR]          (default .vllm-cpu; about 2 GB, a few minutes)
# Then:  PYTHONPATH=$PWD VENV_DIR/bin/python -m ops.cli engine diff-vllm --seeds 200
#        PYTHONPATH=$PWD VENV_DIR/bin/python -m pytest -q tests/unit/engine/test_differential.py
# Env:   VLLM_VERSION (0.33.0), TORCH_SPEC (torch==2.13.0+cpu: vLLM 0.33 pins 2.14.0, whose CPU build this
#        machine's indexes lack; the scheduler uses no torch kernel), TORCH_INDEX (PyTorch's CPU index;
#        empty to use only pip's configured sources), PYTHON (python3.11),
#        GANTRY_SITE (site-packages of Gantry's own venv, appended to the new venv's path so Gantry's
#        dependencies resolve; vLLM's own packages take precedence).
set -euo pipefail

VENV=${1:-.vllm-cpu}
VLLM_VERSION=${VLLM_VERSION:-0.33.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
PYTHON=${PYTHON:-python3.11}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GANTRY_SITE=${GANTRY_SITE:-$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)}

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)

# CPU torch from PyTorch's CPU index (TORCH_INDEX= empty: only from what pip is configured with, e.g. a
# local wheel directory)
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
"${PIP[@]}" "$TORCH_SPEC" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}

"${PIP[@]}" --no-deps "vllm==$VLLM_VERSION"
# these three declare torch/triton as requirements; the scheduler path imports them but runs no kernel
"${PIP[@]}" --no-deps "xgrammar==0.2.8" "compressed-tensors==0.17.0" "apache-tvm-ffi==0.1.11"
# the pure-Python (or CPU-only) packages the scheduler and ModelConfig import, at vLLM 0.33's pins
"${PIP[@]}" regex cachetools psutil numpy "requests>=2.33.0" blake3 py-cpuinfo \
    "transformers>=5.16.1,<5.21.0" "huggingface_hub>=1.31.0" "tokenizers>=0.23.2" \
    "fastapi>=0.133.0,<0.137.0" "aiohttp>=3.14.4" "openai>=2.25.0" "pydantic>=2.12.0" \
    "prometheus_client>=0.18.0" "pillow>=13.0.0" "llguidance>=1.7.0,<1.8.0" "outlines_core==0.2.14" \
    "lark==1.2.2" partial-json-parser "pyzmq>=25.0.0" msgspec einops cloudpickle pybase64 cbor2 \
    "oss-harmony>=0.0.11" uvloop pyyaml sentencepiece protobuf typing_extensions filelock sympy networkx \
    jinja2 fsspec

if "$VENV/bin/pip" list 2>/dev/null | grep -iE '^(nvidia-|triton |cupy|flashinfer)'; then
    echo "error: a CUDA package was installed into $VENV (listed above); remove it" >&2
    exit 1
fi
if [ -n "$GANTRY_SITE" ]; then
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$GANTRY_SITE" > "$site/zz_gantry_venv.pth"
fi
PYTHONPATH=$ROOT "$VENV/bin/python" -c \
    'from ops.vllm_reference import vllm_missing; import sys; m = vllm_missing(); print(m or "vLLM scheduler ready"); sys.exit(1 if m else 0)'
