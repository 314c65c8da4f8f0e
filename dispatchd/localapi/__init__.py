"""The local dispatch API: MicrogridDispatchService on SQLite (not built yet)."""
