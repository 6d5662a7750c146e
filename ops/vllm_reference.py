"""vLLM's real v1 ``Scheduler`` driven through a replay scenario, for the differential harness.

This is the reference side of ``gantry engine diff-vllm``: it builds vLLM's scheduler the way vLLM's own
scheduler tests do (``tests/v1/core/utils.py``: a tiny model config, a KV-cache config with the
scenario's block count, synchronous scheduling), feeds the scenario's requests at their arrival steps,
plays the model by returning each request's next scripted token whenever its computed tokens reach its
length, and records every step in the same shape as ``shared.core.engine.replay.replay``.

It needs a CPU-only vLLM install (``bash ops/vllm_cpu_env.sh``). vLLM's ``ModelConfig`` reads a model's
``config.json``; by default the harness writes a tiny Llama-shaped one to a temporary directory (the model's
shape plays no part in scheduling), so it runs offline; ``model`` may name another local path or hub id.
vLLM is not a dependency of Gantry and is not installed in CI: ``vllm_missing()`` says why the harness
cannot run. The import of vLLM internals follows v0.11–v0.33 module paths; a moved name is reported as
such, never silently skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.core.engine.replay import RequestSpec, Scenario

FILLER_TOKEN = 0  # what the emulator samples past a request's scripted outputs
EOS_TOKEN = 1 << 20  # never sampled; requests ignore EOS anyway
TINY_MODEL = "tiny-llama"  # the default: a config written on first use (see ``tiny_model_dir``)
_TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 8192,
    "max_position_embeddings": 1 << 16, "rms_norm_eps": 1e-5, "torch_dtype": "float16", "bos_token_id": 1,
    "eos_token_id": 2,
}
_tiny_dir: Path | None = None


def _block_hash(obj: Any) -> bytes:
    """Bytes, as recent versions need (they append the group id's bytes); older ones take any hashable."""
    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()


def tiny_model_dir() -> Path:
    """A directory holding a tiny Llama ``config.json`` (written once per process)."""
    global _tiny_dir
    if _tiny_dir is None:
        d = Path(tempfile.mkdtemp(prefix="gantry-vllm-tiny-"))
        (d / "config.json").write_text(json.dumps(_TINY_CONFIG))
        _tiny_dir = d
    return _tiny_dir


def vllm_missing() -> str | None:
    """Why vLLM's scheduler cannot be used here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed: the differential harness needs vLLM's real scheduler "
            "(a CPU-only venv is enough: bash ops/vllm_cpu_env.sh, then run with its python)"
        )
    return None


class VllmReplayer:
    """One vLLM ``Scheduler`` configured like a scenario; ``replay`` yields per-step records."""

    def __init__(self, sc: Scenario, model: str = TINY_MODEL) -> None:
        missing = vllm_missing()
        if missing:
            raise RuntimeError(missing)
        self.sc = sc
        self.model = str(tiny_model_dir()) if model == TINY_MODEL else model
        try:
            self._build()
        except (ImportError, AttributeError, TypeError) as err:
            raise RuntimeError(f"this vLLM version's scheduler API differs from what the harness knows: {err}") from err

    def _build(self) -> None:
        # vLLM picks its platform from the build or the device it finds; the scheduler needs no device, so
        # say CPU (the CUDA-built wheel would otherwise fail to infer one)
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import torch
        from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request, RequestStatus
        from vllm.v1.structured_output import StructuredOutputManager

        c = self.sc.config
        max_model_len = c.max_model_len or 2048  # the tiny model's own limit when the scenario sets none
        sched_kw: dict[str, Any] = {}
        if "is_encoder_decoder" in inspect.signature(SchedulerConfig).parameters:  # v0.2x and later
            sched_kw["is_encoder_decoder"] = False
        sched_cfg = SchedulerConfig(
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=max_model_len,
            long_prefill_token_threshold=c.long_prefill_token_threshold,
            enable_chunked_prefill=c.enable_chunked_prefill,
            policy=c.policy,
            async_scheduling=False,
            **sched_kw,
        )
        model_cfg = ModelConfig(
            model=self.model,
            trust_remote_code=False,
            dtype="float16",
            seed=42,
            skip_tokenizer_init=True,
            max_model_len=max_model_len,
        )
        cache_cfg = CacheConfig(
            block_size=c.block_size,
            gpu_memory_utilization=0.9,
            cache_dtype="auto",
            enable_prefix_caching=c.enable_prefix_caching,
        )
        cache_cfg.num_gpu_blocks = c.num_gpu_blocks
        vllm_cfg = VllmConfig(scheduler_config=sched_cfg, model_config=model_cfg, cache_config=cache_cfg)
        try:  # keyword-only in recent versions
            spec = FullAttentionSpec(block_size=c.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        except TypeError:
            try:  # older versions take a use_mla flag
                spec = FullAttentionSpec(c.block_size, 1, 1, torch.float32, False)
            except TypeError:
                spec = FullAttentionSpec(c.block_size, 1, 1, torch.float32)
        kv_cfg = KVCacheConfig(num_blocks=c.num_gpu_blocks, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        init_none_hash(_block_hash)  # any collision-free hash gives the same schedule
        self._hasher = get_request_block_hasher(c.block_size, _block_hash)
        kw: dict[str, Any] = {
            "vllm_config": vllm_cfg,
            "kv_cache_config": kv_cfg,
            "log_stats": True,
            "structured_output_manager": StructuredOutputManager(vllm_cfg),
        }
        try:
            self._sched = Scheduler(**kw, block_size=c.block_size)
        except TypeError:  # versions before the block_size argument
            self._sched = Scheduler(**kw)
        self._Request, self._SamplingParams = Request, SamplingParams
        self._request_takes_eos = "eos_token_id" in inspect.signature(Request).parameters
        self._ModelRunnerOutput, self._Status = ModelRunnerOutput, RequestStatus

    def _request(self, spec: RequestSpec, step: int) -> Any:
        params = self._SamplingParams(ignore_eos=True, max_tokens=spec.max_tokens)
        kw: dict[str, Any] = {
            "request_id": spec.id,
            "prompt_token_ids": list(spec.prompt_token_ids),
            "sampling_params": params,
            "pooling_params": None,
            "arrival_time": float(step),
            "priority": spec.priority,
            "block_hasher": self._hasher,
        }
        if self._request_takes_eos:  # older versions; newer ones keep EOS in the sampling params
            kw["eos_token_id"] = EOS_TOKEN
        return self._Request(**kw)

    def replay(self) -> Iterator[dict[str, Any]]:
        """Step records: ``{step, scheduled, preempted, num_running, num_waiting, kv_blocks_used, finished}``."""
        s = self._sched
        by_step: dict[int, list[RequestSpec]] = {}
        for r in self.sc.requests:
            by_step.setdefault(r.arrival_step, []).append(r)
        scripted = {r.id: list(r.output_token_ids or []) for r in self.sc.requests}
        last_arrival = max(by_step, default=-1)
        usable = self.sc.config.num_gpu_blocks - 1
        step = 0
        while step <= last_arrival or s.get_num_unfinished_requests() > 0:
            for spec in by_step.get(step, ()):
                s.add_request(self._request(spec, step))
            running_before = {r.request_id for r in s.running}
            out = s.schedule()
            scheduled = [[rid, n] for rid, n in out.num_scheduled_tokens.items()]
            listed = getattr(out, "preempted_req_ids", None)  # newer versions list them in the output
            preempted = sorted(
                listed
                if listed is not None
                else (
                    rid
                    for rid in running_before
                    if rid in s.requests and s.requests[rid].status == self._Status.PREEMPTED
                )
            )
            waiting = len(s.waiting) + len(getattr(s, "skipped_waiting", ()))
            record: dict[str, Any] = {
                "step": step,
                "scheduled": scheduled,
                "preempted": preempted,
                "num_running": len(s.running),
                "num_waiting": waiting,
                "kv_blocks_used": usable - s.kv_cache_manager.block_pool.get_num_free_blocks(),
            }
            req_ids = list(out.num_scheduled_tokens)
            sampled: list[list[int]] = []
            for rid in req_ids:
                req = s.requests[rid]
                if req.num_computed_tokens >= req.num_tokens:
                    k = req.num_output_tokens
                    toks = scripted[rid]
                    sampled.append([toks[k] if k < len(toks) else FILLER_TOKEN])
                else:
                    sampled.append([])
            offered = {
                "req_ids": req_ids,
                "req_id_to_index": {rid: i for i, rid in enumerate(req_ids)},
                "sampled_token_ids": sampled,
                "spec_token_ids": None,
                "logprobs": None,
                "prompt_logprobs_dict": {},
                "pooler_output": [],
            }
            accepted = {f.name for f in dataclasses.fields(self._ModelRunnerOutput)}
            mro = self._ModelRunnerOutput(**{k: v for k, v in offered.items() if k in accepted})
            engine_outputs = s.update_from_output(out, mro)
            finished: list[str] = []
            for eco in engine_outputs.values():
                finished += [o.request_id for o in eco.outputs if o.finish_reason is not None]
            record["finished"] = sorted(finished)
            yield record
            step += 1
