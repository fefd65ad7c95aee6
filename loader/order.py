"""The order units are entered in a step, learned from the last complete step.

Streamed units are copied in this order, so it is the call order (a block's modulation before
its attention, whatever order the block registered its layers in), with repeats when a unit is
entered, left and entered again within a step. Before the first step it is a guess (the
registration order); a unit entered out of the expected order loses the cursor until the
order is learned again at the end of the step.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from torch import nn


class CallOrder:
    """Units in call order, one entry per entering, with a cursor on the entry computing now."""

    def __init__(self, order: list[int]):
        self.learn(order)

    def learn(self, order: list[int]) -> None:
        self.order = list(order)
        self.positions: dict[int, list[int]] = {}
        for pos, unit in enumerate(self.order):
            self.positions.setdefault(unit, []).append(pos)
        self.start_step()

    def start_step(self) -> None:
        self.cursor: int | None = -1  # position of the entry computing now; -1 before the first

    def advance(self, unit: int) -> bool:
        """Move the cursor to the next entry; False (and the cursor lost) when it is not ``unit``."""
        nxt = None if self.cursor is None else self.cursor + 1
        expected = nxt is not None and nxt < len(self.order) and self.order[nxt] == unit
        self.cursor = nxt if expected else None
        return expected

    def is_last_entry(self, unit: int) -> bool:
        """Whether the entry computing now is ``unit``'s last in this step (True when lost)."""
        if self.cursor is None:
            return True
        positions = self.positions.get(unit, [])
        return bisect.bisect_right(positions, self.cursor) == len(positions)

    def upcoming(self, skip: set[int], keep: set[int]) -> Iterator[int]:
        """Units whose next stay in the ring starts after the cursor, in order of their first
        entry, through the end of the next step: this step's units other than ``skip`` (in the
        ring for this step already), then the next step's; only units in ``keep``."""
        if self.cursor is None:
            return
        seen = set(skip)
        for unit in self.order[self.cursor + 1:]:
            if unit in keep and unit not in seen:
                seen.add(unit)
                yield unit
        seen = set()
        for unit in self.order[:self.cursor + 1]:
            if unit in keep and unit not in seen:
                seen.add(unit)
                yield unit


class ModuleCalls:
    """The modules of ``modules`` called during one step, in call order (forward pre-hooks, removed
    by ``close``): the order the engine groups a block's chunks in."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.calls: list[nn.Module] = []
        self._hooks = [m.register_forward_pre_hook(lambda m, a: self.calls.append(m)) for m in modules]

    def first_call(self) -> dict[int, int]:
        """Each called module's first call, by id: its position among the modules first called."""
        first: dict[int, int] = {}
        for module in self.calls:
            first.setdefault(id(module), len(first))
        return first

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
