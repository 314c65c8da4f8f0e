"""memory.settle: one full collection at a quiet moment, its survivors kept out of later ones."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from dispatchd import memory


class Node:
    """Something that can sit in a reference cycle (only the collector frees those)."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    first, second = Node(), Node()
    first.other, second.other = second, first
    return first


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_survivors_are_set_aside_from_later_collections() -> None:
    alive = cycle()
    memory.settle()
    assert gc.get_freeze_count() > 0
    assert not any(obj is alive for obj in gc.get_objects())  # no generation walks it


def test_a_cycle_frozen_by_one_settle_and_dropped_since_is_freed_by_the_next() -> None:
    dropped = cycle()
    gone = weakref.ref(dropped)
    memory.settle()
    del dropped
    gc.collect()
    assert gone() is not None  # frozen: the ordinary collections leave it alone
    memory.settle()
    assert gone() is None


def test_garbage_is_collected_before_anything_is_frozen() -> None:
    garbage = cycle()
    gone = weakref.ref(garbage)
    del garbage
    memory.settle()
    assert gone() is None
