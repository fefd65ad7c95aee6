"""What streaming cost and what the engine is doing: the figures of a run and a snapshot.

Both are plain copies the engine hands out: the stats route, the nodes and the tests read them
without reaching into the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamFigures:
    """What streaming cost in the last run (since the model was last asked to load)."""

    device: str = ""  # the kind of device: "cuda" or "simulated" (a virtual clock)
    budget_bytes: int | None = None
    device_bytes: int = 0
    peak_device_bytes: int = 0
    resident_units: int = 0
    streamed_units: int = 0
    slots: int = 0  # largest streamed units the staging ring holds at once
    ring_bytes: int = 0
    predicted_seconds: float | None = None  # the plan's simulated step, once a step was profiled
    steps: int = 0
    streamed_bytes: int = 0
    # Of those, copied from host memory the device found not page-locked at the copy (the books
    # may say otherwise): such a copy runs at about half speed and holds the host until it is done.
    pageable_bytes: int = 0
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0
    step_seconds: float = 0.0
    # The engine's own host time in steps (its hooks' bookkeeping, wall-clock): the sampling loop
    # runs it between kernel launches, so on a host-bound step it adds to the step.
    host_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def overlap_efficiency(self) -> float | None:
        """The physical bound max(compute, copies) over the measured step time (1.0 = at the bound)."""
        if self.step_seconds <= 0:
            return None
        bound = max(self.step_seconds - self.stall_seconds, self.copy_seconds)
        return min(bound / self.step_seconds, 1.0)

    def placed(self, other: "StreamFigures") -> "StreamFigures":
        """These figures with ``other``'s placement (a re-plan within a run): counters carry on."""
        return StreamFigures(**{**self.__dict__, **{k: getattr(other, k) for k in _PLACEMENT},
                                "peak_device_bytes": max(self.peak_device_bytes, other.peak_device_bytes)})

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "notes"}
        return {**out, "overlap_efficiency": self.overlap_efficiency, "notes": list(self.notes)}


_PLACEMENT = ("budget_bytes", "device_bytes", "resident_units", "streamed_units", "slots", "ring_bytes",
              "predicted_seconds")


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine is doing, for tests and figures: a copy, safe to keep."""

    attached: bool
    order: tuple[str, ...] = ()  # streamed units in the call order they are copied in
    entered: tuple[str, ...] = ()  # units computing now
    held: tuple[str, ...] = ()  # units in the ring for this step (computing, or entered again later)
    queued: tuple[str, ...] = ()  # units copied ahead, not entered yet
    resident: tuple[str, ...] = ()
    ring_bytes: int = 0
    profiled: tuple[tuple, ...] = ()  # activation shapes a step was profiled at
