"""The streaming engine's facade: a diffusion model's units stream through a staging ring.

At build time each block's parameters (or each chunk's, for large blocks) are packed into one
host slab (``packing.py``); after the first streamed step the chunks are grouped again in the
order their layers ran (``chunking.py``). ``attach`` places the model under a VRAM budget: the
planner keeps the weights outside the blocks and a share of the units resident
(``planner.py``), the rest is copied into a ring of R bytes during each step (``placement.py``,
``runtime.py``), in the call order learned from the last step (``order.py``). A step is
bracketed by ``step()`` (in ComfyUI, by the patcher's model-function wrapper). The first
streamed step at an activation shape is profiled (``profile.py``); from then on the plan that
minimises the simulated step time (``simulator.py``) replaces the spread plan.

Copies are byte copies of the stored dtype: streamed output is bit-identical to resident
output, and dtype casts (fp8 → bf16 ...) happen on the device, in the model's own ops.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from .chunking import entered_units, pack_units, regroup_block, regroupings
from .config import StreamConfig
from .device import Device
from .figures import EngineSnapshot, StreamFigures
from .options import GIB
from .order import ModuleCalls
from .packing import TensorSpec, Unit, layout, restore_host_views
from .placement import Placement
from .planner import Plan, plan_for_profile, plan_residency
from .profile import Profile
from .simulator import Timeline
from .threads import owned_by_one_thread

log = logging.getLogger(__name__)

__all__ = ["EngineSnapshot", "StreamConfig", "StreamEngine", "StreamFigures", "TensorSpec", "Unit"]


@owned_by_one_thread
class StreamEngine:
    """Blocks of one diffusion model, packed for streaming; attach places them under a budget."""

    def __init__(self, root: nn.Module, blocks_root: nn.Module, pending: frozenset[int] = frozenset(),
                 chunk_bytes: int | None = None, config: StreamConfig | None = None):
        """
        Args:
            root: the module ComfyUI loads (its tensors outside the blocks stay resident).
            blocks_root: the diffusion model whose blocks stream.
            pending: ids of parameters the params store has not read yet (not copied when packing).
            chunk_bytes: overrides ``config.chunk_bytes`` (0: whole blocks).
            config: how to stream (built once at the node edge, with the environment's overrides).
        """
        config = config or StreamConfig()
        self.config = config if chunk_bytes is None else replace(config, chunk_bytes=chunk_bytes)
        self.root, self.blocks_root = root, blocks_root
        self.units, split = pack_units(blocks_root, self.config.chunk_bytes, pending)
        self._split = split if self.config.chunks_in_call_order else []  # until regrouped in call order
        self.profiles: dict[tuple, Profile] = {}  # by activation shapes
        self._steps_at: Counter[tuple] = Counter()  # completed steps by activation shapes
        self._last_key: tuple | None = None  # the activation shapes of the last completed step
        self.timeline: Timeline | None = None  # copies and compute of the last timed step
        self._time_next = False
        self._figures = StreamFigures()
        self.attached: Placement | None = None
        self._lock = threading.RLock()

    @property
    def unit_bytes(self) -> list[int]:
        return [u.nbytes for u in self.units]

    @property
    def held_bytes(self) -> int:
        return self.attached.held_bytes if self.attached else 0

    @property
    def fixed_bytes(self) -> int:
        """Device bytes of the tensors outside the blocks (always resident)."""
        return layout(self._fixed_tensors())[1]

    @property
    def figures(self) -> StreamFigures:
        """This run's figures; the copy, stall and step times are read from their events now."""
        if self.attached is not None:
            self.attached.read_figures(self._figures)
        return self._figures

    def snapshot(self) -> EngineSnapshot:
        """A public copy of the placement's state, so tests need no private attributes."""
        with self._lock:
            placement = self.attached
            if placement is None:
                return EngineSnapshot(False, profiled=tuple(self.profiles))
            run, names = placement.runtime, [u.name for u in self.units]
            return EngineSnapshot(
                True, tuple(names[i] for i in run.order.order if i in run.streamed),
                tuple(names[i] for i in run.entered), tuple(names[i] for i in run.live),
                tuple(names[s.unit] for s in run.queued), tuple(names[i] for i in sorted(placement.plan.resident)),
                placement.plan.ring_bytes, tuple(self.profiles))

    def attach(self, device: Device, budget_bytes: int | None, prefetch_depth: int | None = None,
               check_interrupt: Callable[[], None] | None = None) -> Plan:
        """Place the model on ``device`` under ``budget_bytes`` (None = no cap) and start streaming.

        Args:
            prefetch_depth: units copied ahead (None: ``config.prefetch_depth``); set, it fixes the
                ring and keeps the spread plan; unset, a profiled shape's plan is used.

        Raises:
            BudgetTooSmallError: the budget is below the minimum (named in GiB).
        """
        with self._lock:
            depth = self.config.prefetch_depth if prefetch_depth is None else prefetch_depth
            profile = self.profiles.get(self._last_key) if self._plans_from_profiles(depth) else None
            plan = plan_for_profile(profile, budget_bytes) if profile is not None else \
                plan_residency(self.unit_bytes, self.fixed_bytes, budget_bytes, depth)
            self._place(device, plan, depth, check_interrupt)
            return plan

    def detach(self) -> None:
        """Back to host weights: no copy in flight, no device bytes held, no hooks."""
        with self._lock:
            if self.attached is not None:
                self.attached.close()  # nothing in flight: every event is read
                self.attached.read_figures(self._figures)
                self.attached = None

    def begin_run(self) -> None:
        """Start this run's figures (ComfyUI asks the model to load at the start of every run)."""
        placement = self.attached
        self._figures = StreamFigures() if placement is None else placement.fresh_figures()

    def shrink(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of device memory by streaming more; returns bytes freed (0 if it can't).

        The run's figures carry on: the counters keep counting, the placement fields change.
        """
        with self._lock:
            placement = self.attached
            if placement is None or nbytes <= 0 or placement.held_bytes - nbytes < placement.plan.minimum_bytes:
                return 0
            before = placement.held_bytes
            self._replace(placement.device, before - nbytes)
            return before - self.held_bytes

    def retry_smaller(self, error: BaseException) -> bool:
        """After an out-of-memory error: re-plan at 3/4 of the bytes held; False if already minimal."""
        placement = self.attached
        if placement is None:
            return False
        held = placement.held_bytes
        freed = self.shrink(held - max(int(held * 0.75), placement.plan.minimum_bytes))
        if freed <= 0:
            return False
        note = (f"out of memory during a streamed step ({str(error).splitlines()[0][:120]}); retried once with "
                f"{self.held_bytes / GIB:.3f} GiB on the device instead of {held / GIB:.3f} GiB")
        log.warning("StreamLoader: %s", note)
        self._figures.notes.append(note)
        return True

    def restore_host_views(self, wanted: Callable[[TensorSpec], bool]) -> int:
        """Point block parameters that ComfyUI copied elsewhere back at their host slab.

        ComfyUI moves weights with ``module.to()``, which allocates new tensors: moving them
        back to the CPU would make a second host copy beside the slab. The slab still holds
        the unpatched bytes, so ``wanted`` parameters (unpatched, back on the host) return to
        it instead. Returns how many were re-pointed.
        """
        return 0 if self.attached is not None else restore_host_views(self.units, wanted)

    def close(self) -> None:
        """Detach and release pinned host memory (the model is being dropped)."""
        with self._lock:
            self.detach()
            for unit in self.units:
                unit.unpin()

    @contextlib.contextmanager
    def step(self, key: tuple = ()):
        """Bracket one step, one forward of the diffusion model at activation shapes ``key``
        (``shapes_of`` its inputs): the units entered between learn the call order, a new shape
        is profiled, and the step ends in a ``finally``, since an interrupt may be a
        BaseException. Nothing to do while detached.

        The placement may change inside (an out-of-memory retry re-places the model): the one in
        place when the step ends ends it.
        """
        if self.attached is None:
            yield
            return
        profiling, timed, self._time_next = self._profiles_at(key), self._time_next, False
        if timed:
            self.timeline = None  # this step's, or none when nothing streams
        streams = self.attached.runtime.ring is not None
        calls = ModuleCalls(m for u in self.units for m in u.weight_modules()) if self._split and streams else None
        self.attached.runtime.begin_step(timed=profiling or timed and streams)
        completed = False
        try:
            yield
            completed = True
        finally:
            if calls is not None:
                calls.close()
            placement = self.attached
            profile, timeline = placement.end_step(completed, key) if placement is not None else (None, None)
            if completed and placement is not None:
                self._steps_at[key] += 1
                if calls is None or not self._regroup(calls):  # regrouped, the old units' profile is void
                    self._step_ended(key, profile if profiling else None, timeline)

    def time_next_step(self) -> None:
        """Time the next step's copies and compute per unit (``timeline``), profiled or not."""
        self._time_next = True

    def _step_ended(self, key: tuple, profile: Profile | None, timeline: Timeline | None) -> None:
        """After a completed step at activation shapes ``key``: keep its timeline and, when it was
        profiled, its profile, and re-place the model when the plan for the measured costs differs
        from the one in place."""
        self._last_key, self.timeline = key, timeline or self.timeline
        placement = self.attached
        if profile is None:  # a shape profiled before keeps the plan in place: shapes that alternate
            return  # within a run (a conditional and an unconditional call) must not re-place each step
        self.profiles[key] = profile
        if not self._plans_from_profiles(placement.prefetch_depth):
            return
        plan = plan_for_profile(profile, placement.plan.budget_bytes)
        if plan.predicted_seconds is None:  # no candidate fits a ring under this budget: keep the plan in place
            return
        if plan.resident == placement.plan.resident and plan.ring_bytes == placement.plan.ring_bytes:
            placement.plan = plan  # the same placement, now with a prediction
            self._figures.predicted_seconds = plan.predicted_seconds
            return
        log.info("StreamLoader: step profiled at %s: %d units resident, a ring of %.1f MiB, %.1f ms predicted",
                 key, len(plan.resident), plan.ring_bytes / 2**20, 1e3 * plan.predicted_seconds)
        self._replace(placement.device, placement.plan.budget_bytes, plan)

    def _regroup(self, calls: ModuleCalls) -> bool:
        """After the first streamed step: pack the split blocks again with their chunks grouped in
        call order and place the model again; False when no grouping changed. Profiles of the old
        units go."""
        split, self._split = self._split, []
        changes = regroupings(self.units, split, self.config.chunk_bytes, calls.first_call())
        if not changes:
            return False
        placement, figures = self.attached, self.figures
        self.detach()
        for change in changes:
            regroup_block(self.units, change)
        self.profiles.clear()
        self.timeline = None
        log.info("StreamLoader: %d blocks regrouped into chunks in call order", len(changes))
        plan = plan_residency(self.unit_bytes, self.fixed_bytes, placement.plan.budget_bytes, placement.prefetch_depth)
        self._place(placement.device, plan, placement.prefetch_depth, placement.check_interrupt,
                    entered_units(self.units, calls.calls))
        self._figures = figures.placed(self._figures)
        return True

    def _profiles_at(self, key: tuple) -> bool:
        """Whether the step about to run at ``key`` is profiled: it streams, at a shape not yet
        profiled, after the device's warm-up steps at that shape."""
        placement = self.attached
        return placement.runtime.ring is not None and key not in self.profiles and \
            self._steps_at[key] >= placement.device.warmup_steps and self._plans_from_profiles(placement.prefetch_depth)

    def _plans_from_profiles(self, depth: int | None) -> bool:
        """Profiled plans replace the spread plan unless a prefetch depth fixes the ring or the config says no."""
        return depth is None and self.config.plan_from_profile

    def _place(self, device: Device, plan: Plan, depth: int | None, check_interrupt,
               order: list[int] | None = None) -> None:
        if order is None and self.attached is not None:
            order = self.attached.runtime.order.order
        self.detach()
        self.attached = Placement(self.units, device, plan, self._fixed_tensors(), depth, check_interrupt, order)
        self.begin_run()

    def _replace(self, device: Device, budget_bytes: int | None, plan: Plan | None = None) -> None:
        """Place again within a run (a new budget, a measured profile): the run's counters carry on."""
        placement, figures = self.attached, self.figures
        if plan is None:
            self.attach(device, budget_bytes, placement.prefetch_depth, placement.check_interrupt)
        else:
            self._place(device, plan, placement.prefetch_depth, placement.check_interrupt)
        self._figures = figures.placed(self._figures)

    def _fixed_tensors(self) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
        streamed = set().union(*(u.keys() for u in self.units)) if self.units else set()
        out = []
        for module in self.root.modules():
            for is_buffer, table in ((False, module._parameters), (True, module._buffers)):
                for name, t in table.items():
                    if t is not None and (id(module), name) not in streamed:
                        out.append((module, name, t.data if not is_buffer else t, is_buffer))
        return out
