"""The two-stream schedule of streamed steps, simulated on a virtual clock.

Plain arithmetic over a ``Profile``: copies run one at a time in use order, each as soon as
the copy engine is free and the staging ring has room for its extent (the bytes it overwrites
are released when their unit's compute ends); compute runs one entry at a time in call order,
each after the previous one and after its unit's copy. The planner ranks plans by the
simulated step time, and the tests check the engine's ring logic against it deterministically.
"""
from __future__ import annotations

from dataclasses import dataclass

from .profile import Profile
from .ring import Ring


class RingDeadlock(RuntimeError):
    """The ring cannot hold the units that must be in it at once (a unit entered, left and
    entered again has to stay while the units between run)."""


@dataclass(frozen=True)
class Span:
    """One unit's copy or one entry's compute on the virtual clock, in seconds."""

    unit: int
    start: float
    end: float
    stall: float = 0.0  # compute only: how long it waited for its copy


@dataclass(frozen=True)
class Timeline:
    """The last simulated step (the steady state): its length, its copies and its compute."""

    step_seconds: float
    copies: tuple[Span, ...]
    compute: tuple[Span, ...]

    @property
    def stall_seconds(self) -> float:
        return sum(s.stall for s in self.compute)

    @property
    def copy_seconds(self) -> float:
        return sum(s.end - s.start for s in self.copies)


@dataclass(frozen=True)
class _Use:
    step: int
    unit: int
    last: int  # global index of its last entry


class _Run:
    """One simulation: the compute cursor advances lazily, when a copy needs ring space."""

    def __init__(self, profile: Profile, resident: frozenset[int], ring_bytes: int, steps: int, overlap: bool):
        self.p, self.steps, self.overlap = profile, steps, overlap
        n = len(profile.order)
        self.entries = [(k // n, profile.order[k % n], profile.entry_seconds[k % n]) for k in range(steps * n)]
        self.uses: list[_Use] = []
        self.use_of: dict[int, int] = {}  # global entry index -> use index
        first: dict[tuple[int, int], int] = {}
        for g, (step, unit, _) in enumerate(self.entries):
            if unit in resident:
                continue
            if (step, unit) not in first:
                first[(step, unit)] = len(self.uses)
                self.uses.append(_Use(step, unit, g))
            use = first[(step, unit)]
            self.uses[use] = _Use(step, unit, g)
            self.use_of[g] = use
        self.ring = Ring(ring_bytes) if self.uses else None
        self.ready: dict[int, float] = {}
        self.released: dict[int, float] = {}
        self.extents: dict[int, object] = {}
        self.step_end: dict[int, float] = {}
        self.copy_free = self.compute_free = 0.0
        self.next = 0
        self.copies: list[tuple[int, Span]] = []
        self.compute: list[tuple[int, Span]] = []

    def run(self) -> Timeline:
        for k, use in enumerate(self.uses):
            self._copy(k, use)
        while self.next < len(self.entries):
            self._advance()
        last = self.steps - 1
        start = self.step_end.get(last - 1, 0.0)
        return Timeline(self.step_end[last] - start, tuple(s for st, s in self.copies if st == last),
                        tuple(s for st, s in self.compute if st == last))

    def _copy(self, k: int, use: _Use) -> None:
        nbytes = self.p.unit_bytes[use.unit]
        while (extent := self.ring.allocate(nbytes, k)) is None:
            self._advance()
        self.extents[k] = extent
        gate = 0.0
        if not self.overlap and use.step > 0:  # a full synchronize ends every step
            while use.step - 1 not in self.step_end:
                self._advance()
            gate = self.step_end[use.step - 1]
        start = max([self.copy_free, gate] + [self.released[t] for t in extent.overwrites])
        self.copy_free = self.ready[k] = start + nbytes / self.p.bandwidth
        self.copies.append((use.step, Span(use.unit, start, self.copy_free)))

    def _advance(self) -> None:
        g = self.next
        if g >= len(self.entries):
            raise RingDeadlock("the schedule ran out of compute while a copy still waited for ring space")
        step, unit, seconds = self.entries[g]
        n = len(self.p.order)
        base = self.compute_free + (self.p.lead_seconds if g % n == 0 else 0.0)
        use = self.use_of.get(g)
        if use is not None and use not in self.ready:
            raise RingDeadlock(f"unit {unit} must run before its copy can find room in the ring")
        start = max(base, self.ready[use]) if use is not None else base
        end = start + seconds
        self.compute.append((step, Span(unit, start, end, start - base)))
        if use is not None and self.uses[use].last == g:
            self.released[use] = end
            self.ring.release(self.extents[use])
        if g % n == n - 1:
            end += self.p.tail_seconds
            self.step_end[step] = end
        self.compute_free = end
        self.next += 1


def simulate(profile: Profile, resident: frozenset[int], ring_bytes: int, steps: int = 3,
             overlap_steps: bool = True) -> Timeline:
    """The schedule of ``steps`` consecutive steps with ``resident`` units on the device and a
    staging ring of ``ring_bytes``; returns the last step's timeline.

    Args:
        overlap_steps: copies for the next step may start during this step's tail (False: a full
            synchronize ends every step, as the first engine did).

    Raises:
        RingDeadlock: the ring is too small for the units that must be in it at once.
        ValueError: a streamed unit is larger than the ring.
    """
    if steps < 1:
        raise ValueError(f"simulate needs at least one step, not {steps}")
    return _Run(profile, frozenset(resident), ring_bytes, steps, overlap_steps).run()
