"""A step's cost profile: what each streamed unit costs to copy and to compute.

The profile is what the planner plans with: the units' bytes, the order their compute runs in
(the learned call order, with repeats when a unit is entered twice), each entry's compute
seconds, the compute outside the units, the host-to-device bandwidth and the bytes outside the
blocks. It is keyed by the activation shapes it was measured at (resolution, batch, frames), so
a new shape is profiled again. Measured on a GPU with events (``runtime``), built by hand in tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Profile:
    """Costs of one step of one model at one activation shape."""

    unit_bytes: tuple[int, ...]
    order: tuple[int, ...]  # unit indices in call order, one entry per entering of a unit
    entry_seconds: tuple[float, ...]  # compute of each entry of ``order``
    bandwidth: float  # host-to-device bytes per second (pinned)
    fixed_bytes: int  # weights outside the units: always resident
    lead_seconds: float = 0.0  # compute before the first unit (embeddings)
    tail_seconds: float = 0.0  # compute after the last unit (final layer)
    key: tuple = ()  # the activation shapes it was measured at

    def __post_init__(self) -> None:
        if len(self.order) != len(self.entry_seconds):
            raise ValueError(f"a profile needs one compute time per entry: {len(self.order)} entries, "
                             f"{len(self.entry_seconds)} times")
        if self.bandwidth <= 0:
            raise ValueError(f"a profile's bandwidth must be positive, not {self.bandwidth} bytes/s")
        unknown = sorted({u for u in self.order if not 0 <= u < len(self.unit_bytes)})
        if unknown:
            raise ValueError(f"a profile's order names units that do not exist: {unknown}")

    @property
    def compute_seconds(self) -> float:
        """A step's compute with every weight resident."""
        return self.lead_seconds + sum(self.entry_seconds) + self.tail_seconds

    def unit_seconds(self) -> list[float]:
        """Compute per unit, over all its entries."""
        out = [0.0] * len(self.unit_bytes)
        for unit, seconds in zip(self.order, self.entry_seconds):
            out[unit] += seconds
        return out

    def bound_seconds(self, budget_bytes: int | None) -> float:
        """The physical bound of a step under ``budget_bytes``: the compute, or copying every byte
        that cannot stay resident beside a ring of the largest unit, whichever is longer."""
        total = sum(self.unit_bytes)
        if budget_bytes is None:
            return self.compute_seconds
        room = budget_bytes - self.fixed_bytes - max(self.unit_bytes, default=0)
        return max(self.compute_seconds, max(total - room, 0) / self.bandwidth)


def shapes_of(args: tuple, kwargs: dict) -> tuple:
    """The activation shapes of a step's inputs (resolution, batch, frames): a profile's key."""
    tensors = [*args, *(kwargs[k] for k in sorted(kwargs))]
    return tuple(tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor))
