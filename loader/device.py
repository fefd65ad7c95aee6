"""Devices the engine streams to: a CUDA GPU, or a simulated device on the CPU.

Both keep the same books: every byte the engine places on the device goes through
``allocate``, so ``held_bytes`` and ``peak_bytes`` are what the pack holds and the budget
is checked against them. The simulated device lets CPU-only machines (and CI) run the
planner, the ring, prefetch and the budget for real: its "device memory" is a separate
pool of CPU tensors, and its copies are real copies, so results are bit-identical; its
times are a virtual clock (copies at a set bandwidth, units at a set compute cost), so the
schedule of copies and compute is deterministic.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .options import GIB, bytes_from_env
from .pinning import CudaPinnedBook, PinnedBook

SIMULATED_CAPACITY_ENV = "STREAMLOADER_SIMULATED_VRAM_GB"
SIMULATED_BANDWIDTH = 25e9  # bytes/s: a PCIe 4 x16 link's pinned copies
SIMULATED_COMPUTE_RATE = 50e9  # weight bytes a unit's compute gets through per second
_UNBOUNDED = 1 << 62


class Device:
    """Allocation books, copies and ordering between the copy stream and compute."""

    kind = "abstract"
    warmup_steps = 0  # steps at a new activation shape before one is profiled

    def __init__(self, torch_device: torch.device, capacity_bytes: int | None, pinned: PinnedBook):
        self.torch_device = torch_device
        self.capacity_bytes = capacity_bytes
        self.pinned = pinned  # the book the host slabs are page-locked through
        self.held_bytes = 0
        self.peak_bytes = 0
        self.copied_bytes = 0  # host-to-device, all copies ever
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self.capacity_bytes is not None and self.held_bytes + nbytes > self.capacity_bytes:
                raise torch.OutOfMemoryError(
                    f"{self.kind} device: {nbytes / GIB:.3f} GiB requested, "
                    f"{(self.capacity_bytes - self.held_bytes) / GIB:.3f} GiB free")
            with torch.inference_mode():  # see packing.page_aligned_empty
                tensor = self._empty(nbytes)
            self.held_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
            return tensor

    def release(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self.held_bytes -= tensor.numel()

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.held_bytes

    def free_bytes(self) -> int:
        return _UNBOUNDED if self.capacity_bytes is None else max(self.capacity_bytes - self.held_bytes, 0)

    def pin(self, host: torch.Tensor) -> bool:
        """Page-lock a host buffer for fast async copies, within the pinned-memory cap."""
        with self._lock:
            return self.pinned.register(host)

    def unpin(self, host: torch.Tensor) -> None:
        with self._lock:
            self.pinned.unregister(host)

    @property
    def pinned_bytes(self) -> int:
        return self.pinned.own_bytes

    @property
    def pinned_cap_bytes(self) -> int:
        return self.pinned.cap_bytes

    # Subclasses: the memory and the streams.
    def _empty(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """Copy ``src`` into ``dst`` once ``after`` (an event of compute) has passed; returns its event."""
        self.copied_bytes += src.nbytes
        with torch.inference_mode():  # the engine's buffers are inference tensors, whatever the caller's mode
            return self._copy(dst, src, after)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after):
        raise NotImplementedError

    def page_locked(self, host: torch.Tensor) -> bool:
        """Whether ``host`` is page-locked now (the simulated device: its book says so). A copy from
        memory that is not blocks the host until the copy stream reaches it, at about half speed."""
        return self.pinned.holds(host)

    def wait(self, event):
        """Make compute wait for ``event``; returns a token for ``stall_seconds`` if it had to wait."""
        raise NotImplementedError

    def stall_seconds(self, tokens: list) -> float:
        """Seconds compute stood still waiting for copies (tokens from ``wait``)."""
        raise NotImplementedError

    def record(self):
        """An event marking everything compute has queued so far."""
        raise NotImplementedError

    def passed(self, event) -> bool:
        """Whether the device is past ``event`` (a copy, a mark, a stall token): reading its time
        will not wait."""
        raise NotImplementedError

    def mark(self):
        """A timing mark on the compute stream, for ``elapsed``."""
        raise NotImplementedError

    def elapsed(self, start, end) -> float:
        """Seconds of compute between two marks (waits for ``end`` to pass)."""
        raise NotImplementedError

    def compute(self, name: str, nbytes: int) -> None:
        """A unit's compute was queued: the simulated device's clock advances; a GPU's ran it."""

    def synchronize(self) -> None:
        raise NotImplementedError

    def copy_seconds(self, events: list) -> float:
        """Seconds the copies behind ``events`` (from ``copy``) took."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Moment:
    """A point on the simulated device's virtual clock; a copy's moment also knows its start."""

    seconds: float
    start: "_Moment | None" = None


class SimulatedDevice(Device):
    """A device on the CPU with a virtual clock: the copies are real (results are bit-identical)
    but take ``bytes / bandwidth`` on a copy stream of their own, and a unit's compute takes
    ``compute(name, nbytes)`` seconds on the compute stream, so overlap, stalls and the ring's
    schedule are deterministic (tests assert on the schedule, never on wall-clock time)."""

    kind = "simulated"

    def __init__(self, capacity_bytes: int | None = None, pinned: PinnedBook | None = None,
                 bandwidth: float = SIMULATED_BANDWIDTH, compute: Callable[[str, int], float] | None = None):
        """
        Args:
            bandwidth: host-to-device bytes per second of a copy.
            compute: seconds one entry of a unit computes, from its name and bytes (default:
                its bytes at ``SIMULATED_COMPUTE_RATE`` bytes per second).
        """
        # Page-locking is bookkeeping here; the cap is enforced all the same.
        super().__init__(torch.device("cpu"), capacity_bytes, pinned or PinnedBook())
        if bandwidth <= 0:
            raise ValueError(f"a simulated device needs a positive `bandwidth`, not {bandwidth} bytes/s")
        self.bandwidth = bandwidth
        self._compute = compute or (lambda name, nbytes: nbytes / SIMULATED_COMPUTE_RATE)
        self.now = 0.0  # the compute stream's clock, seconds
        self.copy_free = 0.0  # when the copy stream is done with what it was given

    def _empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def _copy(self, dst, src, after):
        dst.copy_(src)
        start = max(self.copy_free, self.now if after is None else after.seconds)
        self.copy_free = start + src.nbytes / self.bandwidth
        return _Moment(self.copy_free, _Moment(start))

    def wait(self, event):
        stall = event.seconds - self.now
        if stall <= 0:
            return None
        self.now = event.seconds
        return stall

    def stall_seconds(self, tokens) -> float:
        return sum(tokens)

    def record(self):
        return _Moment(self.now)

    mark = record

    def passed(self, event) -> bool:
        return True

    def elapsed(self, start, end) -> float:
        return end.seconds - start.seconds

    def compute(self, name: str, nbytes: int) -> None:
        self.now += self._compute(name, nbytes)

    def synchronize(self) -> None:
        self.now = max(self.now, self.copy_free)

    def copy_seconds(self, events) -> float:
        return sum(e.seconds - e.start.seconds for e in events)


class CudaDevice(Device):
    """Copies run on one side stream; CUDA events order them against the compute stream."""

    kind = "cuda"
    # A model's first step runs each kernel for the first time (lazy module loading, cuBLAS and
    # cuDNN heuristics): its unit times are not the steady ones a plan is made for.
    warmup_steps = 1

    def __init__(self, torch_device: torch.device, capacity_bytes: int | None = None,
                 pinned: PinnedBook | None = None):
        super().__init__(torch_device, capacity_bytes, pinned or CudaPinnedBook())
        self.copy_stream = torch.cuda.Stream(torch_device)

    def _empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def _copy(self, dst, src, after):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        compute = torch.cuda.current_stream(self.torch_device)  # read outside the `with`: inside it is the copy stream
        with torch.cuda.stream(self.copy_stream):
            if after is None:  # dst may be memory the allocator took back from compute still queued
                self.copy_stream.wait_stream(compute)
            else:
                self.copy_stream.wait_event(after)
            start.record(self.copy_stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.copy_stream)
        end.start = start
        return end

    def page_locked(self, host: torch.Tensor) -> bool:
        # The driver's answer, not the books': a registration someone else undid shows here.
        return host.is_pinned()

    def wait(self, event):
        compute = torch.cuda.current_stream(self.torch_device)
        if event.query():
            return None
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(event)
        after.record(compute)
        return before, after

    def stall_seconds(self, tokens) -> float:
        for _, after in tokens[-1:]:
            after.synchronize()
        return sum(before.elapsed_time(after) for before, after in tokens) / 1000.0

    def record(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.torch_device))
        return event

    def passed(self, event) -> bool:
        return (event[1] if isinstance(event, tuple) else event).query()

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.torch_device))
        return event

    def elapsed(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.torch_device).synchronize()

    def copy_seconds(self, events) -> float:
        for event in events[-1:]:  # copies finish in order: the last one done, all are
            event.synchronize()
        return sum(e.start.elapsed_time(e) for e in events) / 1000.0


_devices: dict[str, Device] = {}
_devices_lock = threading.Lock()


def device_for(torch_device: torch.device, pinned: Callable[[], PinnedBook] | None = None) -> Device:
    """The process-wide Device for a torch device: CUDA as is, the CPU as a simulated device.

    Args:
        pinned: makes the book a new CUDA device pins its slabs through (ComfyUI's, inside
            ComfyUI); the default registers with CUDA directly. The simulated device keeps its own.
    """
    if torch_device.type == "cuda" and torch_device.index is None:  # "cuda" and "cuda:0": one device
        torch_device = torch.device("cuda", torch.cuda.current_device())
    key = str(torch_device)
    with _devices_lock:
        if key not in _devices:
            if torch_device.type == "cuda":
                _devices[key] = CudaDevice(torch_device, pinned=pinned() if pinned is not None else None)
            else:
                capacity = bytes_from_env(SIMULATED_CAPACITY_ENV, GIB, -1)
                _devices[key] = SimulatedDevice(capacity if capacity >= 0 else None)
        return _devices[key]


def copied_bytes() -> int:
    """Host-to-device bytes copied by the engine on every device of this process."""
    with _devices_lock:
        return sum(d.copied_bytes for d in _devices.values())


def pinned_report() -> dict:
    """Page-locked host bytes held by the engine and by ComfyUI, and the one cap both are under."""
    with _devices_lock:
        devices = list(_devices.values())
    cuda = [d for d in devices if d.kind == "cuda"]  # a GPU's book, when there is one
    return ((cuda or devices)[0].pinned if devices else PinnedBook()).report()
