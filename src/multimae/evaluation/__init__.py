"""Metrics (pure functions) and evaluation drivers."""
