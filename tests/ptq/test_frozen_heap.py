"""``lowbit.ptq.memory.frozen_heap``: inside, what was alive is frozen and a collection still frees the cycles the
block makes; after it, nothing stays frozen (in-process callers, the tests among them, keep a normal collector)."""

import gc
import weakref

from lowbit.ptq.memory import frozen_heap


class Node:
    def __init__(self) -> None:
        self.other = self


def test_frozen_heap_freezes_the_living_and_still_collects_new_cycles():
    alive = Node()
    before = gc.get_freeze_count()
    with frozen_heap():
        assert gc.get_freeze_count() > before  # the objects alive at entry, `alive` among them
        cycle = Node()
        reference = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert reference() is None  # made inside: not frozen, collected
    assert gc.get_freeze_count() == 0
    assert alive.other is alive


def test_frozen_heap_unfreezes_when_the_block_raises():
    try:
        with frozen_heap():
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
