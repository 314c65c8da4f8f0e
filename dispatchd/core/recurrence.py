"""Occurrences of a dispatch, from dateutil's rrule in UTC (not built yet)."""
