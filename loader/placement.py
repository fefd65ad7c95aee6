"""One plan's placement: its device memory and the step runtime over it.

``DeviceMemory`` allocates what a plan keeps on the device, copies the fixed and resident
weights in and points the model at them, page-locks the streamed units' host bytes (within the
pinned cap) and allocates the staging ring's buffer; ``close`` undoes all of it. It moves no
data during a step: that is the runtime's job (``runtime.py``). ``Placement`` is one attach of
the engine: the two together, and the figures read from them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .device import Device
from .figures import StreamFigures
from .options import GIB
from .packing import Unit, layout
from .planner import Plan
from .profile import Profile
from .runtime import StepRuntime
from .simulator import Timeline
from .threads import owned_by_one_thread

log = logging.getLogger(__name__)


class DeviceMemory:
    """The device allocations of one plan, and the host bytes its streamed units copy from."""

    def __init__(self, units: list[Unit], fixed: list[tuple[nn.Module, str, torch.Tensor, bool]],
                 device: Device, plan: Plan):
        self.units, self.device, self.plan = units, device, plan
        self.allocations: list[torch.Tensor] = []
        self.host_bases = [u.host_base() for u in units]  # slabs, or packed copies of patched weights
        self.fixed_specs, self.fixed_bytes = layout(fixed)
        self.fixed_host = [t for _, _, t, _ in fixed]
        self.pinned_patched: list[torch.Tensor] = []
        self.streamed = [i for i in range(len(units)) if i not in plan.resident]
        self.ring: torch.Tensor | None = None
        try:
            self._place_fixed()
            self._place_resident()
            for i in self.streamed:
                self._pin(i)
            if self.streamed:
                self.ring = self._allocate(plan.ring_bytes)
            device.synchronize()  # placement copies land before compute reads them
        except BaseException:
            device.synchronize()  # copies already queued must land before their memory is given back
            self.close()
            raise

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() for t in self.allocations)

    def pinning_notes(self) -> list[str]:
        """A note when some streamed units could not be page-locked (the cap is reached)."""
        unpinned = [i for i in self.streamed if not self._is_pinned(i)]
        if not unpinned:
            return []
        nbytes = sum(self.units[i].nbytes for i in unpinned)
        note = (f"{len(unpinned)} streamed units ({nbytes / GIB:.2f} GiB) are not page-locked: the pinned-memory "
                f"cap ({self.device.pinned_cap_bytes / GIB:.1f} GiB, STREAMLOADER_PINNED_CAP_GB) is reached, so "
                "their copies are slower and do not overlap compute")
        log.warning("StreamLoader: %s", note)
        return [note]

    def close(self) -> None:
        """Point the model back at its host weights and give the device memory back (the caller
        has synchronized: nothing in flight reads or writes it)."""
        for unit, base in zip(self.units, self.host_bases):
            unit.point(base)
        for spec, host in zip(self.fixed_specs, self.fixed_host):
            spec.point(host)
        for base in self.pinned_patched:
            self.device.unpin(base)
        self.pinned_patched = []
        for tensor in self.allocations:
            self.device.release(tensor)
        self.allocations, self.ring = [], None
        self.host_bases = []  # a regrouped unit's old slab must not outlive its placement

    def _is_pinned(self, i: int) -> bool:
        base = self.host_bases[i]
        return self.units[i].pinned_on is not None if base is self.units[i].slab else \
            any(base is b for b in self.pinned_patched)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        tensor = self.device.allocate(nbytes)
        self.allocations.append(tensor)
        return tensor

    def _place_fixed(self) -> None:
        if not self.fixed_specs:
            return
        base = self._allocate(self.fixed_bytes)
        for spec, host in zip(self.fixed_specs, self.fixed_host):
            view = spec.view(base)
            self.device.copy(view, host)
            spec.point(view)

    def _place_resident(self) -> None:
        for i in sorted(self.plan.resident):
            base = self._allocate(self.units[i].nbytes)
            self.device.copy(base, self.host_bases[i])
            self.units[i].point(base)

    def _pin(self, i: int) -> None:
        """Page-lock a streamed unit's host bytes (within the cap); the slab stays pinned across runs."""
        unit, base = self.units[i], self.host_bases[i]
        if base is not unit.slab:
            if self.device.pin(base):
                self.pinned_patched.append(base)
        elif unit.pinned_on is None and self.device.pin(base):
            unit.pinned_on = self.device


@owned_by_one_thread
class Placement:
    """One attach: the plan's device memory and the step runtime over it."""

    def __init__(self, units: list[Unit], device: Device, plan: Plan,
                 fixed: list[tuple[nn.Module, str, torch.Tensor, bool]], prefetch_depth: int | None,
                 check_interrupt: Callable[[], None] | None, order: list[int] | None):
        self.device, self.plan = device, plan
        self.prefetch_depth, self.check_interrupt = prefetch_depth, check_interrupt
        self.memory = DeviceMemory(units, fixed, device, plan)
        try:
            self.runtime = StepRuntime(units, self.memory, order or list(range(len(units))), check_interrupt)
        except BaseException:
            device.synchronize()  # the placement's copies may still be in flight
            self.memory.close()
            raise

    @property
    def held_bytes(self) -> int:
        return self.memory.held_bytes

    def fresh_figures(self) -> StreamFigures:
        self.runtime.reset_tally()  # copies made at placement are not this run's
        return StreamFigures(
            device=self.device.kind, budget_bytes=self.plan.budget_bytes, device_bytes=self.held_bytes,
            peak_device_bytes=self.held_bytes, resident_units=len(self.plan.resident),
            streamed_units=len(self.memory.streamed), slots=self.plan.slots, ring_bytes=self.plan.ring_bytes,
            predicted_seconds=self.plan.predicted_seconds, notes=self.memory.pinning_notes())

    def read_figures(self, figures: StreamFigures) -> None:
        """Add the events counted since the last read to ``figures``."""
        tally = self.runtime.take_tally()
        figures.steps += tally.steps
        figures.streamed_bytes += tally.streamed_bytes
        figures.pageable_bytes += tally.pageable_bytes
        figures.host_seconds += tally.host_seconds
        for name, seconds in tally.seconds(self.device).items():
            setattr(figures, name, getattr(figures, name) + seconds)

    def end_step(self, completed: bool = True, key: tuple = ()) -> tuple[Profile | None, Timeline | None]:
        return self.runtime.end_step(completed, key)

    def close(self) -> None:
        self.runtime.close()
        self.memory.close()
