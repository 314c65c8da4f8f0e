"""HTTP endpoints: /metrics, /livez, /healthz, /readyz (not built yet)."""
