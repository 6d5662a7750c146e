"""Scoring service: ranks candidates and picks one per replica."""
