"""Reconciler service: desired vs actual, commits, scale-down, worker loss, PENDING retries."""
