"""Fair share: which microgrid leases a replica should take, and which it should give up.

Pure: the lease keeper (``dispatchd.leases``) reads the lease rows and the
live replicas from the database and asks :func:`plan` what to do next. Every
replica runs the same rule on (almost) the same view, so the rule is
deterministic and avoids fights: a replica below its fair share takes free
leases, one above it hands microgrids over, and each prefers microgrids by a
rendezvous hash of (replica, microgrid), so replicas reach for different
free leases first and a replica keeps the same microgrids across rebalances.

Fair share = ceil(microgrids / live replicas) (docs/replicas.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """One microgrid's lease as last read: its owner and seconds until it expires."""

    owner: str | None
    expires_in: float

    def held(self) -> bool:
        """Whether someone holds it now (an expired lease is free to take)."""
        return self.owner is not None and self.expires_in > 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What the replica does this round."""

    acquire: tuple[int, ...] = ()
    """Free or expired leases to try, in order of preference (another replica may win some)."""
    hand_over: tuple[int, ...] = ()
    """Owned microgrids to drain and release, so a replica below its share can take them."""


NOTHING = Plan()


def fair_share(microgrids: int, live_replicas: int) -> int:
    """The most microgrids one replica should own: ceil(microgrids / live replicas)."""
    return math.ceil(microgrids / max(live_replicas, 1))


def preference(replica_id: str, microgrid_id: int) -> bytes:
    """Rendezvous rank of a microgrid for a replica (lower first); stable across processes."""
    return hashlib.blake2b(f"{replica_id}\x00{microgrid_id}".encode(), digest_size=8).digest()


def plan(
    me: str,
    microgrid_ids: Iterable[int],
    live_replicas: Iterable[str],
    leases: Mapping[int, LeaseRow],
    *,
    handing_over: Iterable[int] = (),
) -> Plan:
    """This round's acquisitions and hand-overs for replica ``me``.

    ``leases`` holds the rows read from the database (a configured microgrid
    without one is free); ``live_replicas`` the members with a fresh
    heartbeat (``me`` counts as live); ``handing_over`` the microgrids ``me``
    is draining already, which are still its own but not handed over twice.
    """
    configured = sorted(set(microgrid_ids))
    live = set(live_replicas) | {me}
    share = fair_share(len(configured), len(live))
    owners: dict[str, list[int]] = {}
    free: list[int] = []
    for microgrid_id in configured:
        row = leases.get(microgrid_id)
        if row is None or not row.held():
            free.append(microgrid_id)
        else:
            assert row.owner is not None
            owners.setdefault(row.owner, []).append(microgrid_id)
    mine = owners.get(me, [])
    leaving = set(handing_over) & set(mine)

    def by_preference(ids: Iterable[int]) -> list[int]:
        return sorted(ids, key=lambda microgrid_id: preference(me, microgrid_id))

    if free:
        others_short = any(
            len(owners.get(replica, [])) < share for replica in live if replica != me
        )
        if len(mine) < share:
            take = by_preference(free)
            return Plan(acquire=tuple(take[: share - len(mine)] if others_short else take))
        # Every other replica is full: nobody else takes these by this rule (their
        # configuration differs, or their view lags), so they must not stay orphans.
        return NOTHING if others_short else Plan(acquire=tuple(by_preference(free)))
    excess = len(mine) - len(leaving) - share
    if excess <= 0:
        return NOTHING
    short = [replica for replica in live if replica != me and len(owners.get(replica, [])) < share]
    if not short:
        return NOTHING
    room = sum(share - len(owners.get(replica, [])) for replica in short)
    keep_last = by_preference(set(mine) - leaving)
    give = keep_last[len(keep_last) - min(excess, room) :]
    return Plan(hand_over=tuple(give))
