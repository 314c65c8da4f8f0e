"""dispatchd tail: print every message on the exchange, one line each (not built yet)."""
