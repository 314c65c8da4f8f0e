"""dispatchd run: wires sync, engine, store, publisher, RPC and HTTP together (not built yet)."""
