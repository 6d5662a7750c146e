"""Emulated model server: the engine core behind an OpenAI-compatible HTTP API, in real time (or faster)."""
