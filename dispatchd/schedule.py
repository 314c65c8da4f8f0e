"""dispatchd schedule: print the occurrences the daemon would run in a window (not built yet)."""
