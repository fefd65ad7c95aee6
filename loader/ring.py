"""The staging ring's bookkeeping: variable-size extents of one buffer of R bytes, in use order.

Plain offsets, no tensors and no devices, so the engine and the schedule simulator share it.
Streamed units take extents in the order they will run, each where the last one ended
(wrapping at the end of the buffer), or in the next gap round the ring that holds it when a
unit entered again later in the step still holds its bytes; an extent is given back when its
unit's compute is done. A new extent reports the extents whose
bytes it overwrites, so its copy can wait on their release (an event on the device, a time in
the simulator) instead of the host waiting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Extent:
    """Bytes ``[offset, offset + nbytes)`` of the ring, held for ``tag`` (a use of a unit)."""

    offset: int
    nbytes: int
    tag: Any
    done: bool = False
    overwrites: list[Any] = field(default_factory=list)  # tags of released extents this one reuses

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class Ring:
    """Extents of a ring of ``nbytes`` bytes, taken in use order from where the last one ended."""

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise ValueError(f"a staging ring needs a positive size, not {nbytes} bytes")
        self.nbytes = nbytes
        self.live: list[Extent] = []  # not released, oldest first
        self.head = 0  # where the newest extent ends: the next one starts here if it fits
        self._freed: list[Extent] = []  # released, not yet overwritten
        self.held_bytes = 0  # bytes of the live extents

    def allocate(self, nbytes: int, tag: Any) -> Extent | None:
        """The next extent of ``nbytes`` for ``tag``, or None while the ring is too full.

        Raises:
            ValueError: ``nbytes`` is larger than the whole ring (it could never fit).
        """
        if nbytes > self.nbytes:
            raise ValueError(f"a unit of {nbytes} bytes does not fit a staging ring of {self.nbytes} bytes; "
                             "the plan's ring must hold its largest streamed unit")
        # Every gap is free bytes, so with fewer free bytes than asked no gap holds them: the
        # full search (a sort of the live extents) is skipped, as it is most calls of a full ring.
        if nbytes > self.nbytes - self.held_bytes:
            return None
        offset = self._free_offset(nbytes)
        if offset is None:
            return None
        extent = Extent(offset, nbytes, tag)
        overlaps = [e for e in self._freed if e.offset < extent.end and offset < e.end]
        extent.overwrites = [e.tag for e in overlaps]
        self._freed = [e for e in self._freed if e not in overlaps]
        self.live.append(extent)
        self.held_bytes += nbytes
        self.head = extent.end
        return extent

    def release(self, extent: Extent) -> None:
        """Its unit's compute is done: its bytes may be overwritten (after its release)."""
        extent.done = True
        self.live.remove(extent)
        self.held_bytes -= extent.nbytes
        self._freed.append(extent)

    def drop_from(self, extent: Extent) -> None:
        """Forget ``extent`` and every newer live extent: copies issued ahead on a wrong guess of
        the order. Their bytes need no release to be reused: copies run in order on one stream,
        so a later copy follows theirs."""
        k = self.live.index(extent)
        self.head = extent.offset
        self.held_bytes -= sum(e.nbytes for e in self.live[k:])
        del self.live[k:]

    def _free_offset(self, nbytes: int) -> int | None:
        """The first gap between live extents, going round from the head, that holds ``nbytes``."""
        head, end = self.head, self.head + nbytes
        if end <= self.nbytes and all(e.end <= head or end <= e.offset for e in self.live):
            return head  # the gap holding the head comes first round the ring: no sort when it holds them
        if not self.live:
            return 0
        starts = sorted(self.live, key=lambda e: e.offset)
        gaps = [(a.end, b.offset) for a, b in zip(starts, starts[1:])]
        gaps += [(starts[-1].end, self.nbytes), (0, starts[0].offset)]
        gaps = [(max(lo, self.head) if lo <= self.head < hi else lo, hi) for lo, hi in gaps]
        gaps.sort(key=lambda g: (g[0] - self.head) % self.nbytes)
        return next((lo for lo, hi in gaps if hi - lo >= nbytes), None)
