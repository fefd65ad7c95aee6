"""The staging ring's shortcuts give the answers of a plain search over its bytes, and the
views kept for a unit's offsets in the ring point where the unit lands."""
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test_streaming_engine's model
from test_streaming_engine import Stack, chunked, device, run  # noqa: E402
from loader import runtime  # noqa: E402
from loader.config import StreamConfig  # noqa: E402
from loader.ring import Ring  # noqa: E402


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


@pytest.mark.parametrize("kept", [1, runtime._KEPT_OFFSETS])
def test_streamed_weights_are_read_from_wherever_the_unit_lands(monkeypatch, kept):
    """Rings where units land at other offsets from step to step; with one offset kept a unit,
    every move forgets the views kept."""
    monkeypatch.setattr(runtime, "_KEPT_OFFSETS", kept)
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(4, 8)
    (expected,) = run(model, x, 1)
    engine = chunked(model, StreamConfig(plan_from_profile=False))
    moves = []
    for slots in (2, 3, 4):
        engine.attach(device(), engine.fixed_bytes + slots * max(engine.unit_bytes) + 20480, prefetch_depth=slots - 1)
        seen: dict[int, set[int]] = {}
        hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(id(m), set()).add(m.weight.data_ptr()))
                 for m in model.modules() if isinstance(m, torch.nn.Linear)]  # after the engine's: what is read
        assert all(torch.equal(out, expected) for out in run(model, x, 8, engine))
        for hook in hooks:
            hook.remove()
        engine.detach()
        moves.append(max(len(ptrs) for ptrs in seen.values()))
    assert max(moves) > 1, "units moved in the ring"
