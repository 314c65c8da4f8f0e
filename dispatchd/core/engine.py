"""The scheduling engine: API changes and time in, messages out (not built yet)."""
