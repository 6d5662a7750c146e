"""Trace loaders (file I/O, outside the pure core): Azure LLM 2023 CSV and Mooncake JSONL."""

from shared.traces.loaders import TRACES, TraceError, load_azure, load_mooncake, load_trace

__all__ = ["TRACES", "TraceError", "load_azure", "load_mooncake", "load_trace"]
