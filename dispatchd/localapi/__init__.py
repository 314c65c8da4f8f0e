"""The local dispatch API: ``MicrogridDispatchService`` over gRPC, kept in SQLite.

Behaviour where the proto leaves room, decided here:

- Create: start times more than ``validation.START_TIME_TOLERANCE`` (10 s) in
  the past are refused; ``start_immediately`` uses the server clock. A
  recurrence with a frequency and interval 0 is stored with interval 1.
  ``end_time`` is ``Schedule.last_end()`` of the daemon's own scheduler.
- Update: mask paths as the official client sends them (``start_time``,
  ``duration``, ``target``, ``is_active``/``active``, ``payload``,
  ``recurrence`` and ``recurrence.<field>``, also
  ``recurrence.end_criteria.count``/``until_time``); ``type`` and
  ``is_dry_run`` cannot change; an empty mask is refused.
- List: filters AND together; within ``targets``, ``dispatch_ids`` and
  ``queries`` the items OR. A target matches on a shared component id or
  category (a category without type matches all its types). ``#<n>`` queries
  match id n, other queries are case-insensitive substrings of the type.
  ``is_recurring`` means a frequency is set. Time intervals are
  ``[start, end)``; a dispatch without an end time (a recurrence without
  count or until) never ends: it matches a lower bound of an end-time
  interval and never an upper one. Default order: create time, newest
  first; an unspecified order with a field is descending too. Pages:
  default 100, at most 1000, keyset tokens (stable under inserts and
  deletes), ``total_items`` on every page.
- Streams: events after the stream subscribed, in commit order; a stream
  more than 1024 events behind is ended with RESOURCE_EXHAUSTED; on shutdown
  streams end with UNAVAILABLE so official clients reconnect.
"""

from dispatchd.localapi.server import LocalApiServer

__all__ = ["LocalApiServer"]
