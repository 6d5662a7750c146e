"""Read public LLM serving traces into :class:`TraceRequest` lists.

- Azure LLM inference trace 2023 (``../shared/data/azure_llm_2023``): ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; arrivals are ``t_i − t_0``; no prefix information, so every prompt is unique.
- Mooncake FAST'25 (``../shared/data/mooncake``): JSONL ``timestamp`` (ms), ``input_length``,
  ``output_length``, ``hash_ids`` (chained 512-token prefix blocks; equal ids share content).

``time_scale`` compresses time: arrivals are divided by it (2.0 = twice the request rate).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from shared.core.limits import MIB
from shared.core.sim.workload import TraceRequest
from shared.paths import data_dir


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


MAX_TRACE_BYTES = 128 * MIB  # read at most this much of a trace (~100x the shipped ones); --limit reads less
MAX_TRACE_LINE = 1 * MIB  # one row or record: a longer line is refused before it is held whole in memory


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of ``path``, each line and the whole read capped, so a hostile file (one
    endless line, gigabytes of rows, binary) is refused in a TraceError instead of filling memory."""
    total = 0
    try:
        with path.open("rb") as fh:
            for lineno in itertools.count(1):
                raw = fh.readline(MAX_TRACE_LINE + 1)
                if not raw:
                    return
                if len(raw) > MAX_TRACE_LINE:
                    raise TraceError(f"{path.name}:{lineno}: line longer than {MAX_TRACE_LINE // MIB} MiB")
                total += len(raw)
                if total > MAX_TRACE_BYTES:
                    raise TraceError(f"{path.name}: larger than the limit of {MAX_TRACE_BYTES // MIB} MiB "
                                     "(use --limit to read only its first requests)")
                try:
                    yield lineno, raw.decode()
                except UnicodeDecodeError:
                    raise TraceError(f"{path.name}:{lineno}: not UTF-8 text") from None
    except OSError as err:
        raise TraceError(f"cannot read {path}: {err.strerror or err}") from None


def _azure_seconds(stamp: str) -> float:
    whole, _, frac = stamp.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + (float("0." + frac) if frac else 0.0)


def _arrival(path: Path, lineno: int, seconds: float, time_scale: float) -> float:
    arrival = seconds / time_scale
    if not math.isfinite(arrival):  # a tiny --time-scale can push a finite time past the float range
        raise TraceError(f"{path.name}:{lineno}: arrival time out of range (check --time-scale)")
    return arrival


def load_azure(path: Path, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Azure 2023 CSV → requests with arrivals relative to the earliest row read (the first, in a sorted file)."""
    out: list[TraceRequest] = []
    first: float | None = None
    earliest = math.inf
    reader = csv.DictReader(text for _, text in _lines(path))
    try:
        for row in reader:
            lineno = reader.line_num  # the file's line (a quoted field may span lines: rows are not lines)
            try:
                t = _azure_seconds(row["TIMESTAMP"])
                plen, olen = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as err:
                raise TraceError(f"{path.name}:{lineno}: bad row ({err})") from None
            if first is None:
                first = t
            if t < earliest:
                earliest = t
            if plen < 1 or olen < 1:
                continue  # nothing to serve
            out.append(TraceRequest(_arrival(path, lineno, t - first, time_scale), plen, olen))
            if limit is not None and len(out) >= limit:
                break
    except csv.Error as err:
        raise TraceError(f"{path.name}: bad CSV ({err})") from None
    if first is not None and earliest < first:  # a row earlier than the first must not arrive before time zero
        shift = (first - earliest) / time_scale
        out = [dataclasses.replace(r, arrival_s=r.arrival_s + shift) for r in out]
    out.sort(key=lambda r: r.arrival_s)
    return out


MOONCAKE_UNIT = 512  # tokens named by one Mooncake hash id


def _mooncake_record(path: Path, lineno: int, line: str, time_scale: float) -> TraceRequest:
    try:
        rec = json.loads(line)
        stamp = float(rec["timestamp"])
        plen, olen = int(rec["input_length"]), int(rec["output_length"])
        ids = rec["hash_ids"]
        if not isinstance(ids, list):  # a string would be read digit by digit
            raise TypeError(f"hash_ids must be a list (got {type(ids).__name__})")
        prefix_ids = tuple(int(h) for h in ids)
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise TraceError(f"{path.name}:{lineno}: bad record ({err})") from None
    if not (math.isfinite(stamp) and stamp >= 0):  # NaN would sort anywhere, inf never arrives
        raise TraceError(f"{path.name}:{lineno}: timestamp must be a finite number of ms >= 0 (got {stamp})")
    if plen > 0 and len(prefix_ids) < -(-plen // MOONCAKE_UNIT):  # each prompt block's content is named by an id
        raise TraceError(f"{path.name}:{lineno}: {len(prefix_ids)} hash_ids name {len(prefix_ids) * MOONCAKE_UNIT} "
                         f"tokens, input_length is {plen} (one id per {MOONCAKE_UNIT}-token block, the last partial)")
    return TraceRequest(_arrival(path, lineno, stamp / 1000.0, time_scale), plen, olen, prefix_ids, MOONCAKE_UNIT)


def load_mooncake(path: Path, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake JSONL → requests carrying their 512-token prefix-block ids."""
    out: list[TraceRequest] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        tr = _mooncake_record(path, lineno, line, time_scale)
        if tr.prompt_len >= 1 and tr.output_len >= 1:
            out.append(tr)
        if limit is not None and len(out) >= limit:
            break
    out.sort(key=lambda r: r.arrival_s)
    return out


TRACES: dict[str, tuple[str, str]] = {
    "azure-conv": ("azure", "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"),
    "azure-code": ("azure", "azure_llm_2023/AzureLLMInferenceTrace_code.csv"),
    "mooncake": ("mooncake", "mooncake/synthetic_trace.jsonl"),
}


def load_trace(name_or_path: str, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """A built-in trace by name (``azure-conv``, ``azure-code``, ``mooncake``) or a CSV/JSONL path."""
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise TraceError(f"time scale must be a finite number > 0 (got {time_scale})")
    if limit is not None and limit < 1:
        raise TraceError(f"--limit must be >= 1 (got {limit})")
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
