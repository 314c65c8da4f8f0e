"""SQLite store: the engine's persisted state and the outbox, in one transaction per step (not built yet)."""
