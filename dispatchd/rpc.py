"""Snapshot RPC server on <exchange>.rpc (wire-v1 section 6) (not built yet)."""
