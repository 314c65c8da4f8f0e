"""Occurrences of one dispatch version, from dateutil's ``rrule`` in UTC.

``Schedule.build`` validates a dispatch once and returns either a ``Schedule``
(queried many times by the engine, the RPC and the SDK) or an ``Invalid`` with
a human-readable reason. Queries never raise.

Speed: a plain ``rrule.before``/``after`` iterates from ``dtstart``, so a
MINUTELY rule started a year ago costs ~500k steps per question. Instead:

- Rules with exactly one start per period (no by-parts, or one hour and one
  minute, one weekday for WEEKLY, one month day <= 28 for MONTHLY/YEARLY) are
  pure arithmetic: start k is ``first + k * period``.
- Other rules are re-anchored: an equivalent ``rrule`` whose ``dtstart`` is
  moved forward by a whole number of periods (interval x frequency unit) to a
  period boundary, with every by-part that ``rrule`` would default from
  ``dtstart`` made explicit, so the set of occurrences after the anchor is
  unchanged. The anchor is cached and moved only when queries move a few
  periods on; the last start before it is searched (backwards, doubling)
  only when a query needs it.
- A ``count`` becomes an inclusive ``until`` at its last start, found once:
  by arithmetic, or by weekly periodicity for MINUTELY..WEEKLY rules without
  month or month-day parts, else by a walk; an ``until`` becomes the last
  start before it, by arithmetic or by a walk backwards.

Budget: rule evaluation must never stall the event loop (dateutil has no
iteration limit, and a sparse rule can take it seconds to walk to the year
9999). The searches ``build`` does (first start, count-th start, last start
before ``until``) run on ``_Walk``, which enumerates the same starts as
dateutil by calendar day and counts its steps; a rule needing more than
``EVALUATION_BUDGET`` steps for one of them is ``Invalid``.

Emptiness: a rule without any occurrence within ``_PROBE_YEARS`` of its start
is ``Invalid`` (its by-rules never match), unless its ``until`` comes before
that horizon: then it is a valid, empty schedule.

Like plain ``rrule``, a recurring rule drops the microseconds of
``start_time``; one-off and infinite dispatches keep them.

Modules: ``schedule`` (``Schedule``, its queries and ``build``),
``validation`` (the fields' checks), ``parts`` (a rule's by-parts made
explicit, calendar arithmetic), ``bounds`` (emptiness, the count-th start)
and ``walk`` (the budgeted walk).
"""

from dispatchd.core.recurrence.schedule import Invalid, Schedule
from dispatchd.core.recurrence.walk import EVALUATION_BUDGET, OverBudget

__all__ = ["EVALUATION_BUDGET", "Invalid", "OverBudget", "Schedule"]
