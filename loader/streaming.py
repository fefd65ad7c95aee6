"""The streaming engine: a diffusion model's blocks stream through a ring of device slots.

At build time each block's parameters (or each chunk's, for large blocks) are packed into
one contiguous host slab; the params store then reads the file straight into it. At
attach, under a VRAM budget, the planner keeps the weights outside the blocks and a
spread-out share of the units resident; the other units are copied into a ring of
pre-allocated device slots, one copy per unit on a side stream, prefetched while earlier
units compute. Parameters are re-pointed (``param.data``) at the slot while their unit
runs and back at the host slab afterwards, so outside a forward the model always reads
its own host weights.

Copies are byte copies of the stored dtype: streamed output is bit-identical to resident
output, and dtype casts (fp8 → bf16 ...) happen on the device, in the model's own ops.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .blocks import discover_blocks
from .device import Device
from .options import GIB, MIB, bytes_from_env
from .planner import Plan, plan_residency
from .threads import owned_by_one_thread

log = logging.getLogger(__name__)

CHUNK_ENV = "STREAMLOADER_CHUNK_MB"
DEFAULT_CHUNK_BYTES = 64 * MIB
# Slab offsets on page boundaries: any dtype aligns, and per-tensor pinning (ComfyUI's
# lowvram path, when streaming is off) never finds a page shared with another tensor.
_ALIGN = 4096


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _page_aligned_empty(nbytes: int) -> torch.Tensor:
    """A host byte buffer that starts on a page boundary (torch's allocator aligns to 64 bytes).

    Always an inference tensor, whatever mode the caller is in: ComfyUI creates parameters
    under inference mode, and an inference parameter whose data becomes a normal tensor fails
    later with "Inference tensors do not track version counter" (ComfyUI unloads outside
    inference mode). Normal parameters take inference data without complaint.
    """
    with torch.inference_mode():
        raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    shift = -raw.data_ptr() % _ALIGN
    return raw[shift:shift + nbytes]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model, by owner and name, and its place in a packed buffer."""

    module: nn.Module
    name: str
    offset: int
    dtype: torch.dtype
    shape: torch.Size
    nbytes: int
    is_buffer: bool = False

    def get(self) -> torch.Tensor:
        return (self.module._buffers if self.is_buffer else self.module._parameters)[self.name]

    def view(self, base: torch.Tensor) -> torch.Tensor:
        # In inference mode whatever the caller's mode: a dtype view of an inference buffer made
        # outside it is a normal tensor (see _page_aligned_empty).
        with torch.inference_mode():
            return base[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def point(self, tensor: torch.Tensor) -> None:
        if self.is_buffer:
            self.module._buffers[self.name] = tensor
        else:
            self.module._parameters[self.name].data = tensor

    def holds(self, base: torch.Tensor) -> bool:
        """Whether the model's tensor is still this spec's view of ``base`` (not replaced, e.g. by a LoRA)."""
        t = self.get()
        return t.data_ptr() == base.data_ptr() + self.offset and t.dtype == self.dtype and t.shape == self.shape


def _layout(tensors: list[tuple[nn.Module, str, torch.Tensor, bool]]) -> tuple[list[TensorSpec], int]:
    specs, offset = [], 0
    for module, name, t, is_buffer in tensors:
        specs.append(TensorSpec(module, name, offset, t.dtype, t.shape, t.nbytes, is_buffer))
        offset = _aligned(offset + t.nbytes)
    return specs, offset


class Unit:
    """A block, or a chunk of a large block: its parameters packed into one contiguous host slab,
    the unit of a copy."""

    def __init__(self, name: str, block: nn.Module, modules: list[nn.Module], pending: frozenset[int]):
        """
        Args:
            block: the block this unit belongs to.
            modules: the modules whose own parameters the unit holds (the whole block, or a chunk).
        """
        self.name, self.module, self.modules = name, block, modules
        params = [(m, n, p, False) for m in modules for n, p in m._parameters.items() if p is not None]
        self.specs, self.nbytes = _layout(params)
        self.slab = _page_aligned_empty(self.nbytes)
        self.pinned_on: Device | None = None  # the device that page-locked the slab
        for spec, (_, _, p, _) in zip(self.specs, params):
            view = spec.view(self.slab)
            if id(p) not in pending:  # unread parameters hold nothing worth copying
                with torch.inference_mode():
                    view.copy_(p.data)
            p.data = view

    def weight_modules(self) -> list[nn.Module]:
        """The modules whose call enters this unit: those holding its parameters, and the block
        itself when the unit is the whole block."""
        whole = len(self.modules) == len(list(self.module.modules()))
        return list(dict.fromkeys([*([self.module] if whole else []), *(s.module for s in self.specs)]))

    def keys(self) -> set[tuple[int, str]]:
        return {(id(s.module), s.name) for s in self.specs}

    def host_base(self) -> torch.Tensor:
        """The slab, or a packed copy when parameters were replaced (ComfyUI's LoRA patching)."""
        if all(spec.holds(self.slab) for spec in self.specs):
            return self.slab
        patched = _page_aligned_empty(self.nbytes)
        for spec in self.specs:
            current = spec.get().data
            if current.dtype != spec.dtype or current.shape != spec.shape:
                raise ValueError(f"`{self.name}`: a patch changed `{spec.name}` to {current.dtype} "
                                 f"{tuple(current.shape)}; streaming needs {spec.dtype} {tuple(spec.shape)}")
            with torch.inference_mode():
                spec.view(patched).copy_(current)
        return patched

    def point(self, base: torch.Tensor, views: list[torch.Tensor] | None = None) -> None:
        for spec, view in zip(self.specs, views or [s.view(base) for s in self.specs]):
            spec.point(view)


def default_chunk_bytes() -> int:
    return bytes_from_env(CHUNK_ENV, MIB, DEFAULT_CHUNK_BYTES)


def split_block(block: nn.Module, chunk_bytes: int) -> list[list[nn.Module]]:
    """The block's parameter-holding modules, in order, as one chunk or (over 2 x chunk_bytes)
    as consecutive chunks of about ``chunk_bytes`` each (a larger module is a chunk alone).

    In a split block, modules under chunk_bytes / 64 (norm scales, biases of their own) stay
    out of every chunk, so resident: attention reads its q/k norms between the qkv and proj
    layers, and a chunk holding them would be entered twice a step."""
    holders = [m for m in block.modules() if any(p is not None for p in m._parameters.values())]
    sizes = [sum(p.nbytes for p in m._parameters.values() if p is not None) for m in holders]
    if not chunk_bytes or sum(sizes) <= 2 * chunk_bytes:
        return [list(block.modules())]
    streamed = [(m, n) for m, n in zip(holders, sizes) if n >= chunk_bytes // 64]
    chunks, current, size = [], [], 0
    for module, nbytes in streamed:
        if current and size + nbytes > chunk_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(module)
        size += nbytes
    return chunks + [current]


@dataclass
class StreamFigures:
    """What streaming cost in the last run (since the model was last asked to load)."""

    device: str = ""  # the kind of device: "cuda" or "simulated"
    budget_bytes: int | None = None
    device_bytes: int = 0
    peak_device_bytes: int = 0
    resident_units: int = 0
    streamed_units: int = 0
    slots: int = 0
    steps: int = 0
    streamed_bytes: int = 0
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0
    step_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def overlap_efficiency(self) -> float | None:
        """The physical bound max(compute, copies) over the measured step time (1.0 = at the bound).
        None on the simulated device, whose copies run in line with compute: nothing overlaps."""
        if self.step_seconds <= 0 or self.device == "simulated":
            return None
        bound = max(self.step_seconds - self.stall_seconds, self.copy_seconds)
        return min(bound / self.step_seconds, 1.0)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "notes"}
        return {**out, "overlap_efficiency": self.overlap_efficiency, "notes": list(self.notes)}


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine is doing, for tests and figures: a copy, safe to keep."""

    attached: bool
    order: tuple[str, ...] = ()  # streamed units in the order they are copied in (learned from a step)
    entered: tuple[str, ...] = ()  # units computing now
    held: tuple[str, ...] = ()  # units whose device copy compute is reading now


@owned_by_one_thread
class StreamEngine:
    """Blocks of one diffusion model, packed for streaming; attach places them under a budget."""

    def __init__(self, root: nn.Module, blocks_root: nn.Module, pending: frozenset[int] = frozenset(),
                 chunk_bytes: int | None = None):
        """
        Args:
            root: the module ComfyUI loads (its tensors outside the blocks stay resident).
            blocks_root: the diffusion model whose blocks stream.
            pending: ids of parameters the params store has not read yet (not copied when packing).
            chunk_bytes: blocks over twice this size stream in chunks of about this size, so the
                ring stays small and more of the budget holds resident weights (None: the
                default, ``STREAMLOADER_CHUNK_MB`` or 64 MiB; 0: whole blocks).
        """
        self.root, self.blocks_root = root, blocks_root
        chunk = default_chunk_bytes() if chunk_bytes is None else chunk_bytes
        self.units = [Unit(f"{name}[{k}]" if len(chunks) > 1 else name, block, modules, pending)
                      for name, block in discover_blocks(blocks_root)
                      for chunks in [split_block(block, chunk)] for k, modules in enumerate(chunks)]
        self.figures = StreamFigures()
        self.attached: _Placement | None = None
        self._lock = threading.RLock()

    @property
    def unit_bytes(self) -> list[int]:
        return [u.nbytes for u in self.units]

    @property
    def held_bytes(self) -> int:
        return self.attached.held_bytes if self.attached else 0

    def snapshot(self) -> EngineSnapshot:
        """A public copy of the placement's state, so tests need no private attributes."""
        with self._lock:
            placement = self.attached
            if placement is None:
                return EngineSnapshot(False)
            names = [u.name for u in self.units]
            return EngineSnapshot(True, tuple(names[i] for i in placement.schedule.order),
                                  tuple(names[i] for i in placement.entered),
                                  tuple(names[s.unit] for s in placement.slots if s.busy))

    @property
    def fixed_bytes(self) -> int:
        """Device bytes of the tensors outside the blocks (always resident)."""
        return _layout(self._fixed_tensors())[1]

    def attach(self, device: Device, budget_bytes: int | None, prefetch_depth: int | None = None,
               check_interrupt: Callable[[], None] | None = None) -> Plan:
        """Place the model on ``device`` under ``budget_bytes`` (None = no cap) and start streaming.

        Raises:
            BudgetTooSmallError: the budget is below the minimum (named in GiB).
        """
        with self._lock:
            self.detach()
            fixed = self._fixed_tensors()
            plan = plan_residency(self.unit_bytes, _layout(fixed)[1], budget_bytes, prefetch_depth)
            self.attached = _Placement(self, device, plan, fixed, check_interrupt)
            self.begin_run()
            return plan

    def detach(self) -> None:
        """Back to host weights: no copy in flight, no device bytes held, no hooks."""
        with self._lock:
            if self.attached is not None:
                self.attached.close()
                self.attached = None

    def begin_run(self) -> None:
        """Start this run's figures (ComfyUI asks the model to load at the start of every run)."""
        placement = self.attached
        self.figures = StreamFigures() if placement is None else placement.fresh_figures()

    def shrink(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of device memory by streaming more; returns bytes freed (0 if it can't).

        The run's figures carry on: the counters keep counting, the placement fields change.
        """
        with self._lock:
            placement = self.attached
            if placement is None or nbytes <= 0 or placement.held_bytes - nbytes < placement.plan.minimum_bytes:
                return 0
            before, figures = placement.held_bytes, self.figures
            self.attach(placement.device, before - nbytes, placement.plan.prefetch_depth, placement.check_interrupt)
            fresh = self.figures
            self.figures = replace(figures, budget_bytes=fresh.budget_bytes, device_bytes=fresh.device_bytes,
                                   resident_units=fresh.resident_units, streamed_units=fresh.streamed_units,
                                   slots=fresh.slots, peak_device_bytes=max(figures.peak_device_bytes,
                                                                            fresh.peak_device_bytes))
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
        self.figures.notes.append(note)
        return True

    def restore_host_views(self, wanted: Callable[[TensorSpec], bool]) -> int:
        """Point block parameters that ComfyUI copied elsewhere back at their host slab.

        ComfyUI moves weights with ``module.to()``, which allocates new tensors: moving them
        back to the CPU would make a second host copy beside the slab. The slab still holds
        the unpatched bytes, so ``wanted`` parameters (unpatched, back on the host) return to
        it instead. Returns how many were re-pointed.
        """
        if self.attached is not None:
            return 0
        moved = [(u, s) for u in self.units for s in u.specs if not s.holds(u.slab) and wanted(s)]
        for unit, spec in moved:
            current = spec.get()
            if current.dtype == spec.dtype and current.shape == spec.shape:
                spec.point(spec.view(unit.slab))
        return len(moved)

    def close(self) -> None:
        """Detach and release pinned host memory (the model is being dropped)."""
        with self._lock:
            self.detach()
            for unit in self.units:
                if unit.pinned_on is not None:
                    unit.pinned_on.unpin(unit.slab)
                    unit.pinned_on = None

    def _fixed_tensors(self) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
        streamed = set().union(*(u.keys() for u in self.units)) if self.units else set()
        out = []
        for module in self.root.modules():
            for is_buffer, table in ((False, module._parameters), (True, module._buffers)):
                for name, t in table.items():
                    if t is not None and (id(module), name) not in streamed:
                        out.append((module, name, t.data if not is_buffer else t, is_buffer))
        return out


class _Slot:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.unit: int | None = None
        self.ready = None  # event: the copy into this slot finished
        self.released = None  # event: compute stopped reading this slot
        self.busy = False


class _Schedule:
    """The order streamed units are entered in a step, learned from the last step, with repeats
    (a chunk can run, give way to another chunk, and run again within one block)."""

    def __init__(self, order: list[int]):
        self.learn(order)

    def learn(self, order: list[int]) -> None:
        self.order = order
        self.cursor = -1  # position of the unit computing now; -1 before a step's first
        self.positions: dict[int, list[int]] = {}
        for pos, unit in enumerate(order):
            self.positions.setdefault(unit, []).append(pos)

    def advance(self, unit: int) -> None:
        """Move the cursor to ``unit``'s next entry (None when the order does not know it)."""
        if self.cursor is None:  # lost earlier in this step: pick the order up again here
            self.cursor = self.positions[unit][0] if unit in self.positions else None
            return
        pos = self.distance(unit)
        self.cursor = None if pos is None else (self.cursor + pos) % len(self.order)

    def distance(self, unit: int) -> int | None:
        """Entries from the cursor to ``unit``'s next one (cyclic: the next step follows this one)."""
        positions = self.positions.get(unit)
        if not positions or self.cursor is None:
            return None
        k = bisect.bisect_right(positions, self.cursor)
        nxt = positions[k] if k < len(positions) else positions[0] + len(self.order)
        return nxt - self.cursor

    def upcoming(self, count: int) -> list[int]:
        """The next ``count`` distinct units after the cursor."""
        out: list[int] = []
        if self.cursor is None:
            return out
        n = len(self.order)
        for k in range(1, n + 1):
            unit = self.order[(self.cursor + k) % n]
            if unit not in out and unit != self.order[self.cursor % n]:
                out.append(unit)
            if len(out) == count:
                break
        return out


@owned_by_one_thread
class _Placement:
    """One attach: device allocations, the ring, the hooks and their bookkeeping."""

    def __init__(self, engine: StreamEngine, device: Device, plan: Plan,
                 fixed: list[tuple[nn.Module, str, torch.Tensor, bool]], check_interrupt):
        self.engine, self.device, self.plan, self.check_interrupt = engine, device, plan, check_interrupt
        self.units = engine.units
        self.allocations: list[torch.Tensor] = []
        self.hooks = []
        self.host_bases = [u.host_base() for u in self.units]
        self.fixed_specs, fixed_bytes = _layout(fixed)
        self.fixed_host = [t for _, _, t, _ in fixed]
        self.streamed = [i for i in range(len(self.units)) if i not in plan.resident]
        self.schedule = _Schedule(list(self.streamed))
        self.slots: list[_Slot] = []
        self.views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.entered: dict[int, _Slot] = {}
        self.sequence: list[int] = []
        self.copy_events, self.stall_tokens = [], []
        self.pinned_patched: list[torch.Tensor] = []
        self.root_wrapped = False
        self.step_start = time.perf_counter()
        try:
            self._place_fixed(fixed_bytes)
            self._place_blocks()
            self.device.synchronize()  # placement copies land before compute reads them
        except BaseException:
            self.close()
            raise

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() for t in self.allocations)

    def fresh_figures(self) -> StreamFigures:
        return StreamFigures(
            device=self.device.kind, budget_bytes=self.plan.budget_bytes, device_bytes=self.held_bytes,
            peak_device_bytes=self.held_bytes, resident_units=len(self.plan.resident),
            streamed_units=len(self.streamed), slots=len(self.slots), notes=self._pinning_notes())

    def _pinning_notes(self) -> list[str]:
        unpinned = [i for i in self.streamed if not self._is_pinned(i)]
        if not unpinned:
            return []
        nbytes = sum(self.units[i].nbytes for i in unpinned)
        note = (f"{len(unpinned)} streamed units ({nbytes / GIB:.2f} GiB) are not page-locked: the pinned-memory "
                f"cap ({self.device.pinned_cap_bytes / GIB:.1f} GiB, STREAMLOADER_PINNED_CAP_GB) is reached, so "
                "their copies are slower and do not overlap compute")
        log.warning("StreamLoader: %s", note)
        return [note]

    def _is_pinned(self, i: int) -> bool:
        base = self.host_bases[i]
        return self.units[i].pinned_on is not None if base is self.units[i].slab else \
            any(base is b for b in self.pinned_patched)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        tensor = self.device.allocate(nbytes)
        self.allocations.append(tensor)
        return tensor

    def _place_fixed(self, nbytes: int) -> None:
        if not self.fixed_specs:
            return
        base = self._allocate(nbytes)
        for spec, host in zip(self.fixed_specs, self.fixed_host):
            view = spec.view(base)
            self.device.copy(view, host)
            spec.point(view)

    def _place_blocks(self) -> None:
        for i in sorted(self.plan.resident):
            base = self._allocate(self.units[i].nbytes)
            self.device.copy(base, self.host_bases[i])
            self.units[i].point(base)
        if not self.streamed:
            return
        for i in self.streamed:
            self._pin(i)
        self.slots = [_Slot(self._allocate(self.plan.slot_bytes)) for _ in range(self.plan.slots)]
        self._install_hooks()

    def _install_hooks(self) -> None:
        # Some models run a block's layers without calling the block (ComfyUI's UNet runs each
        # layer of a TimestepEmbedSequential): any module holding a unit's weights enters it.
        blocks: dict[int, nn.Module] = {}
        for i in self.streamed:
            for module in self.units[i].weight_modules():
                self.hooks.append(module.register_forward_pre_hook(lambda m, a, i=i: self.enter(i)))
            blocks[id(self.units[i].module)] = self.units[i].module
        for block in blocks.values():
            self.hooks.append(block.register_forward_hook(lambda m, a, o: self.exit_block(m), always_call=True))
        self._wrap_root_forward()

    def _wrap_root_forward(self) -> None:
        """Each forward of the diffusion model is a step, ended in a ``finally``: a forward hook
        would miss interrupts, which newer ComfyUI raises as a BaseException (torch runs
        ``always_call`` hooks for Exceptions only)."""
        root = self.engine.blocks_root
        self.root_forward = root.__dict__.get("forward")  # an instance override to restore, if any
        self.root_wrapped = True
        original = root.forward

        def forward(*args, **kwargs):
            self.begin_step()
            completed = False
            try:
                out = original(*args, **kwargs)
                completed = True
                return out
            finally:
                self.end_step(completed)

        root.forward = forward

    def _unwrap_root_forward(self) -> None:
        root = self.engine.blocks_root
        if self.root_forward is not None:
            root.forward = self.root_forward
        else:
            root.__dict__.pop("forward", None)

    def _pin(self, i: int) -> None:
        """Page-lock a streamed unit's host bytes (within the cap); the slab stays pinned across runs."""
        unit, base = self.units[i], self.host_bases[i]
        if base is not unit.slab:
            if self.device.pin(base):
                self.pinned_patched.append(base)
        elif unit.pinned_on is None and self.device.pin(base):
            unit.pinned_on = self.device

    # The step: begin_step → (enter i)* → end_step, from forward hooks.
    def begin_step(self) -> None:
        self.sequence = []
        self.schedule.cursor = -1
        self.step_start = time.perf_counter()

    def enter(self, i: int) -> None:
        if i in self.entered:
            return  # a layer of the unit that is running
        for other in list(self.entered):  # units run one after another: the previous one is done
            self.exit(other)
        if self.check_interrupt is not None:
            self.check_interrupt()
        self.sequence.append(i)
        self.schedule.advance(i)
        slot = self._slot_of(i) or self._load(i, self._victim())
        token = self.device.wait(slot.ready)
        if token is not None:
            self.stall_tokens.append(token)
        slot.busy = True
        self.units[i].point(slot.tensor, self._views(slot, i))
        self.entered[i] = slot
        self._prefetch()

    def exit(self, i: int) -> None:
        slot = self.entered.pop(i, None)
        if slot is None:
            return
        slot.released = self.device.record()
        slot.busy = False
        self.units[i].point(self.host_bases[i], self._views(None, i))

    def exit_block(self, block: nn.Module) -> None:
        for i in [i for i in self.entered if self.units[i].module is block]:
            self.exit(i)

    def end_step(self, completed: bool = True) -> None:
        for i in list(self.entered):  # a forward that raised (an interrupt) skipped some exits
            self.exit(i)
        self.device.synchronize()  # no copy in flight past a step; makes the timings readable
        figures = self.engine.figures
        if self.sequence and completed:  # an interrupted step saw only part of the order
            self.schedule.learn(self.sequence)
        figures.steps += 1
        figures.step_seconds += time.perf_counter() - self.step_start
        figures.copy_seconds += self.device.copy_seconds(self.copy_events)
        figures.stall_seconds += self.device.stall_seconds(self.stall_tokens)
        self.copy_events, self.stall_tokens = [], []

    def _prefetch(self) -> None:
        """Copy the next units ahead into slots whose units are needed later than they are."""
        for j in self.schedule.upcoming(self.plan.prefetch_depth):
            if self._slot_of(j) is not None:
                continue
            slot = self._victim(needed_in=self.schedule.distance(j))
            if slot is None:
                return
            self._load(j, slot)

    def _victim(self, needed_in: int | None = None) -> _Slot | None:
        """The idle slot whose unit is needed last (Belady); with ``needed_in``, only one whose
        unit is needed later than that."""
        def next_use(slot: _Slot) -> float:
            if slot.unit is None:
                return float("inf")
            distance = self.schedule.distance(slot.unit)
            return float("inf") if distance is None else distance

        idle = [s for s in self.slots if not s.busy]
        slot = max(idle, key=next_use, default=None)
        if slot is None or (needed_in is not None and next_use(slot) <= needed_in):
            return None
        return slot

    def _slot_of(self, i: int) -> _Slot | None:
        return next((s for s in self.slots if s.unit == i), None)

    def _load(self, i: int, slot: _Slot | None) -> _Slot:
        if slot is None:
            raise RuntimeError(f"StreamLoader: no free slot for `{self.units[i].name}`: "
                               f"{len(self.entered)} units are running at once, the ring has {len(self.slots)}")
        unit = self.units[i]
        slot.unit = i
        slot.ready = self.device.copy(slot.tensor[:unit.nbytes], self.host_bases[i], after=slot.released)
        self.copy_events.append(slot.ready)
        self.engine.figures.streamed_bytes += unit.nbytes
        return slot

    def _views(self, slot: _Slot | None, i: int) -> list[torch.Tensor]:
        key = (-1 if slot is None else self.slots.index(slot), i)
        if key not in self.views:
            base = self.host_bases[i] if slot is None else slot.tensor
            self.views[key] = [spec.view(base) for spec in self.units[i].specs]
        return self.views[key]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.root_wrapped:
            self._unwrap_root_forward()
            self.root_wrapped = False
        self.hooks = []
        for i in list(self.entered):
            self.exit(i)
        self.device.synchronize()
        for unit, base in zip(self.units, self.host_bases):
            unit.point(base)
        for spec, host in zip(self.fixed_specs, self.fixed_host):
            spec.point(host)
        for base in self.pinned_patched:
            self.device.unpin(base)
        self.pinned_patched = []
        for tensor in self.allocations:
            self.device.release(tensor)
        self.allocations, self.slots, self.views = [], [], {}
