"""The residency planner: which blocks stay on the device under a budget, and the ring size.

Streamed blocks are copied while the blocks before them compute. A copy can only hide
behind compute that runs while it is in flight, so resident blocks are spread evenly over
the stack instead of forming a prefix: with a resident prefix the streamed tail has no
compute left to hide behind (measured on an H200: 17-24% over the bound with a prefix,
2-4% with resident blocks spread; see the README).
"""
from __future__ import annotations

from dataclasses import dataclass

from .options import GIB

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
    slot_bytes: int  # size of one ring slot (the largest streamed block)
    slots: int  # ring slots: one computing, the rest prefetching
    minimum_bytes: int

    @property
    def prefetch_depth(self) -> int:
        return max(self.slots - 1, 0)

    def device_bytes(self, unit_bytes: list[int]) -> int:
        """Device bytes the plan holds: fixed weights, resident blocks and the ring."""
        return self.fixed_bytes + sum(unit_bytes[i] for i in self.resident) + self.slots * self.slot_bytes


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
    return Plan(budget_bytes, fixed_bytes, resident, slot_bytes, slots if slot_bytes else 0, minimum)


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
