"""API sync: one stream + list per microgrid through DispatchApiClient, fed to the engine (not built yet)."""
