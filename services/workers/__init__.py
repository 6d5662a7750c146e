"""Emulated GPU workers: heartbeats, model-file downloads and instance lifecycles without hardware."""
