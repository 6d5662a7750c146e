"""Read public LLM serving traces into :class:`TraceRequest` lists.

- Azure LLM inference trace 2023 (``../shared/data/azure_llm_2023``): ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; arrivals are ``t_i − t_0``; no prefix information, so every prompt is unique.
- Mooncake FAST'25 (``../shared/data/mooncake``): JSONL ``timestamp`` (ms), ``input_length``,
  ``output_length``, ``hash_ids`` (chained 512-token prefix blocks; equal ids share content).

``time_scale`` compresses time: arrivals are divided by it (2.0 = twice the request rate).
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

from shared.core.sim.workload import TraceRequest
from shared.paths import data_dir


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


def _azure_seconds(stamp: str) -> float:
    whole, _, frac = stamp.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + (float("0." + frac) if frac else 0.0)


def load_azure(path: Path, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Azure 2023 CSV → requests with arrivals relative to the first row."""
    out: list[TraceRequest] = []
    t0: float | None = None
    try:
        with path.open(newline="") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    t = _azure_seconds(row["TIMESTAMP"])
                    plen, olen = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                except (KeyError, ValueError, TypeError) as err:
                    raise TraceError(f"{path.name}:{lineno}: bad row ({err})") from None
                if t0 is None:
                    t0 = t
                if plen < 1 or olen < 1:
                    continue  # nothing to serve
                out.append(TraceRequest((t - t0) / time_scale, plen, olen))
                if limit is not None and len(out) >= limit:
                    break
    except OSError as err:
        raise TraceError(f"cannot read {path}: {err.strerror}") from None
    out.sort(key=lambda r: r.arrival_s)
    return out


def load_mooncake(path: Path, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake JSONL → requests carrying their 512-token prefix-block ids."""
    out: list[TraceRequest] = []
    try:
        with path.open() as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    tr = TraceRequest(
                        float(rec["timestamp"]) / 1000.0 / time_scale,
                        int(rec["input_length"]),
                        int(rec["output_length"]),
                        tuple(int(h) for h in rec["hash_ids"]),
                        512,
                    )
                except (KeyError, ValueError, TypeError) as err:
                    raise TraceError(f"{path.name}:{lineno}: bad record ({err})") from None
                if tr.prompt_len >= 1 and tr.output_len >= 1:
                    out.append(tr)
                if limit is not None and len(out) >= limit:
                    break
    except OSError as err:
        raise TraceError(f"cannot read {path}: {err.strerror}") from None
    out.sort(key=lambda r: r.arrival_s)
    return out


TRACES: dict[str, tuple[str, str]] = {
    "azure-conv": ("azure", "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"),
    "azure-code": ("azure", "azure_llm_2023/AzureLLMInferenceTrace_code.csv"),
    "mooncake": ("mooncake", "mooncake/synthetic_trace.jsonl"),
}


def load_trace(name_or_path: str, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """A built-in trace by name (``azure-conv``, ``azure-code``, ``mooncake``) or a CSV/JSONL path."""
    if time_scale <= 0:
        raise TraceError("time scale must be > 0")
    if name_or_path in TRACES:
        kind, rel = TRACES[name_or_path]
        path = data_dir() / rel
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise TraceError(f"unknown trace {name_or_path!r}: not a file, nor one of {', '.join(TRACES)}")
        kind = "mooncake" if path.suffix in (".jsonl", ".json") else "azure"
    loader = load_mooncake if kind == "mooncake" else load_azure
    return loader(path, time_scale, limit)
