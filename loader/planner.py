"""The residency planner: which blocks stay on the device under a budget, and the ring size.

Streamed blocks are copied while the blocks before them compute. A copy can only hide
behind compute that runs while it is in flight, so resident blocks are spread evenly over
the stack instead of forming a prefix: with a resident prefix the streamed tail has no
compute left to hide behind (measured on an H200: 17-24% over the bound with a prefix,
2-4% with resident blocks spread; see the README).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from .options import GIB
from .profile import Profile
from .simulator import RingDeadlock, simulate

DEFAULT_PREFETCH_DEPTH = 1


class BudgetTooSmallError(ValueError):
    """The budget cannot hold what must stay resident plus one streaming slot."""

    def __init__(self, budget_bytes: int, minimum_bytes: int):
        self.budget_bytes, self.minimum_bytes = budget_bytes, minimum_bytes
        super().__init__(
            f"The VRAM budget of {budget_bytes / GIB:.3f} GiB is below this model's minimum of "
            f"{minimum_bytes / GIB:.3f} GiB for streaming (the non-block weights plus one slot for its largest "
            f"block). Raise `max_vram_gb` to at least {minimum_bytes / GIB:.3f}, or free VRAM.")


@dataclass(frozen=True)
class Plan:
    budget_bytes: int | None
    fixed_bytes: int  # weights outside the blocks: always resident
    resident: frozenset[int]  # indices of the blocks that stay on the device
    slot_bytes: int  # the largest streamed unit
    ring_bytes: int  # the staging ring streamed units are copied into (0: nothing streams)
    minimum_bytes: int
    predicted_seconds: float | None = None  # the simulated step time, when planned from a profile

    @property
    def slots(self) -> int:
        """Largest streamed units the ring holds at once."""
        return self.ring_bytes // self.slot_bytes if self.slot_bytes else 0

    @property
    def prefetch_depth(self) -> int:
        return max(self.slots - 1, 0)

    def device_bytes(self, unit_bytes: list[int]) -> int:
        """Device bytes the plan holds: fixed weights, resident blocks and the ring."""
        return self.fixed_bytes + sum(unit_bytes[i] for i in self.resident) + self.ring_bytes


def plan_residency(unit_bytes: list[int], fixed_bytes: int, budget_bytes: int | None,
                   prefetch_depth: int | None = None) -> Plan:
    """Choose the resident blocks and the ring under ``budget_bytes`` (None = no cap).

    Raises:
        BudgetTooSmallError: the budget cannot hold the fixed weights and one slot.
    """
    everything = frozenset(range(len(unit_bytes)))
    largest = max(unit_bytes, default=0)
    minimum = fixed_bytes + largest
    if budget_bytes is None or fixed_bytes + sum(unit_bytes) <= budget_bytes:
        return Plan(budget_bytes, fixed_bytes, everything, 0, 0, minimum)
    if budget_bytes < minimum:
        raise BudgetTooSmallError(budget_bytes, minimum)
    depth = DEFAULT_PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth
    slots = max(1, min(depth + 1, (budget_bytes - fixed_bytes) // largest))
    resident = _spread(unit_bytes, budget_bytes - fixed_bytes - slots * largest)
    # A smaller largest streamed block frees ring bytes for more resident blocks.
    slot_bytes = max((b for i, b in enumerate(unit_bytes) if i not in resident), default=0)
    if slot_bytes < largest:
        resident = _fill(unit_bytes, resident, budget_bytes - fixed_bytes - slots * slot_bytes)
        slot_bytes = max((b for i, b in enumerate(unit_bytes) if i not in resident), default=0)
    return Plan(budget_bytes, fixed_bytes, resident, slot_bytes, slots * slot_bytes, minimum)


def _spread(unit_bytes: list[int], room: int) -> frozenset[int]:
    """Resident blocks spread evenly over the stack (by bytes), then any that still fit."""
    total = sum(unit_bytes)
    share = room / total if total else 0.0
    chosen, taken, seen = set(), 0, 0
    for i, size in enumerate(unit_bytes):
        seen += size
        if taken + size <= min(share * seen + size / 2, room):
            chosen.add(i)
            taken += size
    return _fill(unit_bytes, frozenset(chosen), room)


def _fill(unit_bytes: list[int], chosen: frozenset[int], room: int) -> frozenset[int]:
    out, taken = set(chosen), sum(unit_bytes[i] for i in chosen)
    for i, size in enumerate(unit_bytes):
        if i not in out and taken + size <= room:
            out.add(i)
            taken += size
    return frozenset(out)


RING_SIZES = tuple(q / 4 for q in range(4, 33))  # rings tried, in largest streamed units: 1, 1.25 ... 8
# Steps simulated per candidate, the last one predicted: the second starts with the first one's
# prefetch, but the ring's extents may settle later (ComfyUI's SDXL UNet at 2 GiB, with the plan
# that two steps choose: 105.0 ms at the second step, 106.4 at the third, 105.2 from then on; the
# plan three steps choose runs 105.0 throughout). A plan takes 0.1-0.7 s on this 2-core CPU.
SIMULATED_STEPS = 3


@functools.lru_cache(maxsize=64)
def plan_for_profile(profile: Profile, budget_bytes: int | None) -> Plan:
    """The resident units and ring bytes under ``budget_bytes`` that minimise the simulated step
    time of ``profile`` (the plan once a step has been measured). Remembered: a model placed
    again under a budget it had (a run after ComfyUI unloaded it) is not planned again (a plan
    takes 0.1-0.7 s on a 2-core CPU).

    Candidates keep resident, within the room the ring leaves, the units cheapest to compute per
    byte (a copy-bound step hides copies behind the streamed units' compute), the same with the
    largest units first (smaller streamed units need a smaller ring), the dearest (a compute-bound
    step hides copies behind resident compute), or the spread of the plan before a profile; each
    with the rings of ``RING_SIZES``. A candidate whose bound is no better than the best
    prediction so far is not simulated.

    Raises:
        BudgetTooSmallError: the budget cannot hold the fixed weights and one unit.
    """
    sizes = list(profile.unit_bytes)
    base = plan_residency(sizes, profile.fixed_bytes, budget_bytes, 0)
    if not base.ring_bytes:
        return replace(base, predicted_seconds=profile.compute_seconds)
    best = None
    for choose in _choosers(profile):
        for units in RING_SIZES:
            plan = _candidate(profile, budget_bytes, choose, units, best)
            if plan is not None:
                best = plan
    return best or base


def _choosers(profile: Profile) -> list:
    """Ways to pick resident units for a room of bytes, most promising first."""
    sizes, cost = list(profile.unit_bytes), profile.unit_seconds()
    cheap = sorted(range(len(sizes)), key=lambda i: (cost[i] / sizes[i], i))
    return [lambda room: _paced(profile, cheap, room), lambda room: _fill_ranked(sizes, cheap, room),
            lambda room: _fill_ranked(sizes, cheap[::-1], room), lambda room: _spread(sizes, room)]


def _paced(profile: Profile, ranking: list[int], room: int) -> frozenset[int]:
    """Stream units in call order while their copies keep pace with the compute before them
    (copy seconds over compute seconds as in the whole step), keep the others resident, then
    fill what room is left in ``ranking`` order: no stretch of the step is copy-heavy while
    another is compute-heavy, so a small ring keeps both streams busy."""
    sizes, cost = profile.unit_bytes, profile.unit_seconds()
    ratio = max(sum(sizes) - room, 0) / profile.bandwidth / profile.compute_seconds
    resident, taken, copied, computed = set(), 0, 0.0, profile.lead_seconds
    for i in dict.fromkeys(profile.order):
        copy = sizes[i] / profile.bandwidth
        if copied + copy > ratio * computed and taken + sizes[i] <= room:
            resident.add(i)
            taken += sizes[i]
        else:
            copied += copy
        computed += cost[i]
    return _fill_ranked(list(sizes), [i for i in ranking if i not in resident], room - taken) | resident


def _candidate(profile: Profile, budget_bytes: int, choose, ring_units: float, best: Plan | None) -> Plan | None:
    """The plan ``choose`` makes with a ring of ``ring_units`` largest streamed units, if it
    predicts a shorter step than ``best``."""
    sizes, fixed = list(profile.unit_bytes), profile.fixed_bytes
    slot = max(sizes)
    resident = frozenset()
    for _ in range(2):  # a smaller largest streamed unit leaves room for more resident units
        room = budget_bytes - fixed - int(ring_units * slot)
        if room < 0:
            return None
        resident = choose(room)
        slot = max((b for i, b in enumerate(sizes) if i not in resident), default=0)
    streamed = sum(sizes) - sum(sizes[i] for i in resident)
    bound = max(profile.compute_seconds, streamed / profile.bandwidth)
    if not slot or (best is not None and bound >= best.predicted_seconds):
        return None
    ring = int(ring_units * slot)
    try:
        seconds = simulate(profile, resident, ring, SIMULATED_STEPS).step_seconds
    except RingDeadlock:
        return None
    if best is not None and seconds >= best.predicted_seconds:
        return None
    return Plan(budget_bytes, fixed, resident, slot, ring, fixed + max(sizes), seconds)


def _fill_ranked(unit_bytes: list[int], ranking: list[int], room: int) -> frozenset[int]:
    chosen, taken = set(), 0
    for i in ranking:
        if taken + unit_bytes[i] <= room:
            chosen.add(i)
            taken += unit_bytes[i]
    return frozenset(chosen)
