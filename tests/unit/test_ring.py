"""The staging ring's shortcuts give the answers of a plain search over its bytes."""
import random

import pytest

from loader.ring import Ring


def reference_offset(ring: Ring, nbytes: int) -> int | None:
    """``Ring``'s rule by brute force over a byte map: the first free run, going round from the
    head, that holds ``nbytes`` without wrapping; the run holding the head starts at the head."""
    size = ring.nbytes
    busy = [False] * size
    for e in ring.live:
        for b in range(e.offset, e.end):
            busy[b] = True
    head = ring.head % size if ring.live else ring.head
    if not ring.live:
        return ring.head if ring.head + nbytes <= size else 0
    for start in [*range(head, size), *range(0, head)]:
        run_start = start == head or start == 0 or busy[start - 1]
        if busy[start] or not run_start:
            continue
        end = start
        while end < size and not busy[end]:
            end += 1
        if start != head and start <= ring.head < end:  # the run holding the head starts there
            continue
        if end - start >= nbytes:
            return start
    return None


@pytest.mark.parametrize("seed", range(40))
def test_ring_answers_match_a_plain_search(seed):
    rng = random.Random(seed)
    ring = Ring(rng.choice([64, 100, 257]))
    for _ in range(400):
        op = rng.random()
        if op < 0.55:
            nbytes = rng.randint(1, ring.nbytes // rng.choice([1, 2, 3, 5]))
            expected = reference_offset(ring, nbytes)
            extent = ring.allocate(nbytes, object())
            assert (extent.offset if extent else None) == expected
        elif op < 0.9 and ring.live:
            ring.release(rng.choice(ring.live))
        elif ring.live:
            ring.drop_from(rng.choice(ring.live))
        assert ring.held_bytes == sum(e.nbytes for e in ring.live)
