"""The wire-v1 encoding: routing keys, headers, bodies, message ids (not built yet)."""
