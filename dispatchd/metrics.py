"""Prometheus metric definitions, one place for every dispatchd_ name (not built yet)."""
