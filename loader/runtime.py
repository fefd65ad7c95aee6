"""The per-step runtime: units entered in call order, streamed through the staging ring.

While anything streams, forward pre-hooks on every unit's modules enter it (resident units only
for the order and the profile); entering a streamed unit makes compute wait for its copy (an
event: the host never blocks) and points its parameters at its extent of the ring; leaving it
points them back at the host slab and, after its last entry of the step, releases the extent. After every entry and
release, ``prefetch`` issues copies in call order, as far ahead as the ring has room, each
waiting on the release of the bytes it overwrites; the last units of a step copy the next
step's first. A unit entered out of the expected order drops the copies issued ahead (a wrong
guess) and is copied at once; the order is learned again at the end of the step.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .device import Device
from .order import CallOrder
from .packing import Unit
from .profile import Profile
from .ring import Extent, Ring
from .simulator import Span, Timeline
from .threads import owned_by_one_thread

if TYPE_CHECKING:
    from .placement import DeviceMemory  # which imports this module

_KEPT_OFFSETS = 4  # ring offsets per unit whose views are kept


@dataclass(eq=False)
class _Stay:
    """A streamed unit's stay in the ring: its extent, its copy's event, its release."""

    unit: int
    extent: Extent
    ready: Any = None  # event: the copy into the extent finished
    released: Any = None  # event: compute stopped reading the extent
    seq: int = -1  # release order: the latest release covers the earlier ones


@dataclass
class Tally:
    """Events of copies, stalls and steps not yet read into the figures (read when asked for)."""

    streamed_bytes: int = 0
    pageable_bytes: int = 0  # of those, copied from host memory that was not page-locked
    steps: int = 0
    host_seconds: float = 0.0  # wall-clock time in the runtime's hooks and step ends
    copies: list = field(default_factory=list)
    stalls: list = field(default_factory=list)
    steps_marked: list = field(default_factory=list)  # (start, end) marks of each step

    def seconds(self, device: Device) -> dict:
        return {"copy_seconds": device.copy_seconds(self.copies), "stall_seconds": device.stall_seconds(self.stalls),
                "step_seconds": sum(device.elapsed(a, b) for a, b in self.steps_marked)}


class _StepTimer:
    """Marks around every entry of one step, turned into a ``Profile`` and a ``Timeline`` when it ends."""

    def __init__(self, device: Device):
        self.device, self.start = device, device.mark()
        self.before: list = []  # each entry: before its copy wait
        self.after: list = []  # each entry: after it

    def read(self, units: list[Unit], order: list[int], copies: list[tuple[int, Any]], fixed_bytes: int,
             key: tuple) -> tuple[Profile | None, Timeline]:
        """The step's profile (None without copies to measure the bandwidth) and its timeline."""
        end, device = self.device.mark(), self.device
        since = lambda mark: device.elapsed(self.start, mark)  # noqa: E731
        step_seconds = since(end)  # first: every mark of the step has passed once the last one has
        # An entry lasts from after its copy wait to the next entry's wait: the compute between
        # units (attention between a block's chunks) counts with the unit before it.
        ends = self.before[1:] + [end]
        compute = tuple(Span(u, since(a), since(b), device.elapsed(w, a)) for u, w, a, b in
                        zip(order, self.before, self.after, ends))
        copied = tuple(Span(u, since(e.start), since(e)) for u, e in copies)
        timeline = Timeline(step_seconds, copied, compute)
        if not compute or timeline.copy_seconds <= 0:
            return None, timeline
        return Profile(tuple(u.nbytes for u in units), tuple(order), tuple(s.end - s.start for s in compute),
                       sum(units[s.unit].nbytes for s in copied) / timeline.copy_seconds, fixed_bytes,
                       lead_seconds=compute[0].start - compute[0].stall, key=key), timeline


@owned_by_one_thread
class StepRuntime:
    """One placement's steps: the hooks, the ring's stays and the copies ahead."""

    def __init__(self, units: list[Unit], memory: DeviceMemory, order: list[int],
                 check_interrupt: Callable[[], None] | None):
        self.units, self.memory, self.device = units, memory, memory.device
        self.check_interrupt = check_interrupt
        self.streamed = frozenset(memory.streamed)
        self.order = CallOrder(order)
        self.ring = Ring(memory.plan.ring_bytes) if memory.ring is not None else None
        self.live: dict[int, _Stay] = {}  # units in the ring for this step's entries
        self.queued: list[_Stay] = []  # copies issued ahead, in use order, not entered yet
        self.entered: dict[int, _Stay | None] = {}
        self.sequence: list[int] = []
        self.releases = 0
        self.tally = Tally()
        self.copies: list[tuple[int, Any]] = []  # (unit, event) since the last step ended: the bandwidth
        self.timer: _StepTimer | None = None
        self.host_views: dict[int, list[torch.Tensor]] = {}
        self.ring_views: dict[int, dict[int, list[torch.Tensor]]] = {}  # unit -> extent offset -> views
        self.step_start = None
        self.placed = self.device.record()  # fresh ring bytes: compute queued before the ring existed
        # Nothing streams without a ring: the order and the profile are of no use, and the hooks
        # would cost every layer call torch's slow path and the runtime's bookkeeping (ComfyUI's
        # SDXL UNet, all resident: 3 ms a step of bookkeeping alone on this CPU).
        self.hooks = self._install_hooks() if self.ring is not None else []
        self.prefetch()  # the first streamed units are copied at placement, not inside the first step

    def begin_step(self, timed: bool = False) -> None:
        self.sequence = []
        self.order.start_step()
        self.step_start = self.device.mark()
        self.timer = _StepTimer(self.device) if timed else None

    def end_step(self, completed: bool = True, key: tuple = ()) -> tuple[Profile | None, Timeline | None]:
        """End the step; returns its profile and timeline when it was timed and completed."""
        started = time.perf_counter()
        try:
            return self._end_step(completed, key)
        finally:
            self.tally.host_seconds += time.perf_counter() - started

    def _end_step(self, completed: bool, key: tuple) -> tuple[Profile | None, Timeline | None]:
        for i in list(self.entered):  # a forward that raised (an interrupt) skipped some exits
            self.exit(i)
        for i in list(self.live):  # and some units' last entries
            self._release(self.live.pop(i))
        profile = timeline = None
        if completed and self.sequence and self.timer is not None:
            profile, timeline = self.timer.read(self.units, self.sequence, self.copies, self.memory.fixed_bytes, key)
        if self.step_start is not None:
            self.tally.steps_marked.append((self.step_start, self.device.mark()))
        self.tally.steps += 1
        self.timer, self.copies, self.step_start = None, [], None
        if completed and self.sequence:
            if self.sequence != self.order.order:  # copies issued ahead followed the old order
                self._drop_queued()
                self.order.learn(self.sequence)
            self.order.start_step()
            self.prefetch()
        elif not completed or self.queued:  # an interrupted step saw only part of the order: nothing stays in flight
            self._drop_queued()
            self.order.start_step()
            self.device.synchronize()
        return profile, timeline

    def enter(self, i: int) -> None:
        if i in self.entered:
            return  # a layer of the unit that is running
        started = time.perf_counter()
        self._enter(i)
        self.tally.host_seconds += time.perf_counter() - started

    def _enter(self, i: int) -> None:
        for other in list(self.entered):  # units run one after another: the previous one is done
            self.exit(other)
        if self.check_interrupt is not None:
            self.check_interrupt()
        expected = self.order.advance(i)
        self.sequence.append(i)
        before = self.device.mark() if self.timer is not None else None
        stay = None if i not in self.streamed else self._stay_for(i, expected)
        if stay is not None:
            token = self.device.wait(stay.ready)
            if token is not None:
                self.tally.stalls.append(token)
            self.units[i].point(self.memory.ring, self._ring_views(stay))
            self.live[i] = stay
        if self.timer is not None:
            self.timer.before.append(before)
            self.timer.after.append(self.device.mark())
        self.entered[i] = stay
        if stay is not None:
            self.prefetch()

    def exit(self, i: int) -> None:
        if i not in self.entered:
            return
        stay = self.entered.pop(i)
        unit = self.units[i]
        self.device.compute(unit.name, unit.nbytes)
        if stay is None:
            return
        unit.point(self.memory.host_bases[i], self._host_views(i))
        if self.order.is_last_entry(i):  # a unit entered again later in this step keeps its extent
            self._release(self.live.pop(i))
            self.prefetch()

    def exit_block(self, block: nn.Module) -> None:
        started = time.perf_counter()
        for i in [i for i in self.entered if self.units[i].module is block]:
            self.exit(i)
        self.tally.host_seconds += time.perf_counter() - started

    def prefetch(self) -> None:
        """Copy the next stays in call order into the ring, as far ahead as it has room."""
        if self.ring is None:
            return
        upcoming = self.order.upcoming(set(self.live), self.streamed)
        for k, unit in enumerate(upcoming):
            if k < len(self.queued):
                if self.queued[k].unit == unit:
                    continue
                self._drop_queued(k)  # the order changed under the copies ahead
            stay = self._stage(unit)
            if stay is None:
                return
            self.queued.append(stay)

    def take_tally(self) -> Tally:
        """The counts so far and the events that have passed; events still pending stay for the next
        read, so reading figures never waits for the device."""
        old, self.tally = self.tally, Tally()
        for name, last in (("copies", lambda e: e), ("stalls", lambda t: t), ("steps_marked", lambda m: m[1])):
            done = [(item, self.device.passed(last(item))) for item in getattr(old, name)]
            setattr(old, name, [item for item, passed in done if passed])
            setattr(self.tally, name, [item for item, passed in done if not passed])
        return old

    def reset_tally(self) -> None:
        self.tally = Tally()

    def close(self) -> None:
        """Remove the hooks; no copy in flight, no exit bookkeeping: everything goes."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.ring, self.entered, self.live, self.queued = [], None, {}, {}, []
        self.ring_views, self.host_views = {}, {}  # views keep the ring's device bytes and old slabs alive
        self.device.synchronize()

    def _stay_for(self, i: int, expected: bool) -> _Stay:
        if i in self.live:
            return self.live[i]
        if expected and self.queued and self.queued[0].unit == i:
            return self.queued.pop(0)
        self._drop_queued()  # a wrong guess: the copies ahead are for other units
        stay = self._stage(i)
        idle = [u for u in self.live if u not in self.entered]
        while stay is None and idle:  # units held for a later entry give way; they are copied again
            self._release(self.live.pop(idle.pop(0)))
            stay = self._stage(i)
        if stay is None:
            raise RuntimeError(f"StreamLoader: `{self.units[i].name}` ({self.units[i].nbytes} bytes) does not fit "
                               f"the staging ring of {self.ring.nbytes} bytes beside the units computing now")
        return stay

    def _stage(self, i: int) -> _Stay | None:
        """Take an extent for unit ``i`` and issue its copy, after the compute that last read those
        bytes; None while the ring has no room."""
        nbytes = self.units[i].nbytes
        extent = self.ring.allocate(nbytes, None)
        if extent is None:
            return None
        stay = extent.tag = _Stay(i, extent)
        readers = [s for s in extent.overwrites if s.released is not None]
        after = max(readers, key=lambda s: s.seq).released if readers else self.placed
        host = self.memory.host_bases[i]
        stay.ready = self.device.copy(self.memory.ring[extent.offset:extent.end], host, after)
        self.tally.copies.append(stay.ready)
        self.tally.streamed_bytes += nbytes
        if not self.device.page_locked(host):
            self.tally.pageable_bytes += nbytes
        self.copies.append((i, stay.ready))
        return stay

    def _release(self, stay: _Stay) -> None:
        """Compute queued so far is the last to read ``stay``'s extent: its bytes may be reused."""
        stay.released, stay.seq = self.device.record(), self.releases
        self.releases += 1
        self.ring.release(stay.extent)

    def _drop_queued(self, keep: int = 0) -> None:
        """Forget the copies issued ahead from the ``keep``-th on (their order was a wrong guess)."""
        if len(self.queued) > keep:
            self.ring.drop_from(self.queued[keep].extent)
            del self.queued[keep:]

    def _ring_views(self, stay: _Stay) -> list[torch.Tensor]:
        # In a steady state a unit lands where it landed the step before: its views there are kept
        # (a few offsets a unit, the oldest forgotten; the ring's tensor lives as long as this runtime).
        offset, kept = stay.extent.offset, self.ring_views.setdefault(stay.unit, {})
        if offset not in kept:
            if len(kept) >= _KEPT_OFFSETS:
                del kept[next(iter(kept))]
            kept[offset] = self.units[stay.unit].views(self.memory.ring[offset:stay.extent.end])
        return kept[offset]

    def _host_views(self, i: int) -> list[torch.Tensor]:
        if i not in self.host_views:
            self.host_views[i] = self.units[i].views(self.memory.host_bases[i])
        return self.host_views[i]

    def _install_hooks(self) -> list:
        # Some models run a block's layers without calling the block (ComfyUI's UNet runs each
        # layer of a TimestepEmbedSequential): any module holding a unit's weights enters it.
        hooks, blocks = [], {}
        for i, unit in enumerate(self.units):
            for module in unit.weight_modules():
                hooks.append(module.register_forward_pre_hook(lambda m, a, i=i: self.enter(i)))
            blocks[id(unit.module)] = unit.module
        for block in blocks.values():
            hooks.append(block.register_forward_hook(lambda m, a, o: self.exit_block(m), always_call=True))
        return hooks
