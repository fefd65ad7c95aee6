"""The staging ring's bookkeeping: variable-size extents of one buffer of R bytes, in use order.

Plain offsets, no tensors and no devices, so the engine and the schedule simulator share it.
Streamed units take extents in the order they will run (first in, first out, wrapping at the
end of the buffer); an extent is given back when its unit's compute is done, and its bytes
become free once every older extent is given back too. A new extent reports the extents whose
bytes it overwrites, so its copy can wait on their release (an event on the device, a time in
the simulator) instead of the host waiting.
"""
from __future__ import annotations

from collections import deque
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
    """First-in-first-out extents of a ring of ``nbytes`` bytes."""

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise ValueError(f"a staging ring needs a positive size, not {nbytes} bytes")
        self.nbytes = nbytes
        self.live: deque[Extent] = deque()
        self._freed: list[Extent] = []  # released, not yet overwritten

    @property
    def held_bytes(self) -> int:
        """Bytes between the oldest and newest live extents (what is not free to allocate)."""
        if not self.live:
            return 0
        head, tail = self.live[-1].end, self.live[0].offset
        return head - tail if head > tail else self.nbytes - tail + head

    def allocate(self, nbytes: int, tag: Any) -> Extent | None:
        """The next extent of ``nbytes`` for ``tag``, or None while the ring is too full.

        Raises:
            ValueError: ``nbytes`` is larger than the whole ring (it could never fit).
        """
        if nbytes > self.nbytes:
            raise ValueError(f"a unit of {nbytes} bytes does not fit a staging ring of {self.nbytes} bytes; "
                             "the plan's ring must hold its largest streamed unit")
        offset = self._free_offset(nbytes)
        if offset is None:
            return None
        extent = Extent(offset, nbytes, tag)
        extent.overwrites = [e.tag for e in self._freed if e.offset < extent.end and offset < e.end]
        self._freed = [e for e in self._freed if not (e.offset < extent.end and offset < e.end)]
        self.live.append(extent)
        return extent

    def release(self, extent: Extent) -> None:
        """Its unit's compute is done; the bytes free up once every older extent is released too."""
        extent.done = True
        while self.live and self.live[0].done:
            self._freed.append(self.live.popleft())

    def drop_newer(self, extent: Extent | None) -> list[Extent]:
        """Forget every live extent newer than ``extent`` (all of them if None): a prefetch that
        guessed the order wrong. Returns the dropped extents, oldest first. Their bytes need no
        release to be reused: copies run in order on one stream, so a later copy follows theirs."""
        dropped = []
        while self.live and self.live[-1] is not extent:
            dropped.append(self.live.pop())
        return dropped[::-1]

    def _free_offset(self, nbytes: int) -> int | None:
        if not self.live:
            return 0
        head, tail = self.live[-1].end, self.live[0].offset
        if head > tail:  # not wrapped: free after the head and before the tail
            if head + nbytes <= self.nbytes:
                return head
            return 0 if nbytes <= tail else None
        return head if head + nbytes <= tail else None
