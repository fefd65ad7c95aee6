"""Load options: the four toggles of a loader node, validated once and frozen.

``max_vram_bytes`` keeps the sign convention of stable-diffusion.cpp's ``--max-vram``:
0 = no cap, > 0 = a cap in bytes, < 0 = auto (free device memory minus that headroom).
Only ``weight_dtype`` changes the bytes a model holds, so only it enters the cache key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


@dataclass(frozen=True)
class LoadOptions:
    offload_to_cpu: bool = True
    stream_layers: bool = False
    max_vram_bytes: int = 0
    eager_load: bool = False
    weight_dtype: str = "default"

    def __post_init__(self) -> None:
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"`weight_dtype` must be one of {', '.join(WEIGHT_DTYPES)}, not {self.weight_dtype!r}")
        if not isinstance(self.max_vram_bytes, int):
            raise ValueError(f"`max_vram_bytes` must be an int, not {type(self.max_vram_bytes).__name__}")

    @classmethod
    def from_ui(cls, *, max_vram_gb: float = 0.0, **toggles) -> "LoadOptions":
        """Build options from node inputs; gigabytes exist only at the UI edge."""
        return cls(max_vram_bytes=int(round(max_vram_gb * GIB)), **toggles)

    @property
    def cache_key(self) -> tuple:
        """The part of the options that changes the bytes held in memory."""
        return (self.weight_dtype,)

    def notes(self, has_gpu: bool) -> list[str]:
        """What a chosen toggle does here, or why it has no effect; shown on the node, never silent."""
        notes = []
        if not has_gpu and not self.offload_to_cpu:
            notes.append("`offload_to_cpu` off has no effect: there is no GPU, weights stay in RAM.")
        if self.stream_layers and not self.offload_to_cpu:
            notes.append("`stream_layers` has no effect with `offload_to_cpu` off: weights already live on the GPU.")
        elif self.stream_layers and not has_gpu:
            notes.append("`stream_layers` runs on a simulated device (no GPU): the budget, the ring and the "
                         "figures are real; the times are CPU times.")
        elif self.stream_layers and self.max_vram_bytes == 0:
            notes.append("`stream_layers` without a `max_vram_gb` budget: ComfyUI's free-memory estimate is the budget.")
        if not has_gpu and self.max_vram_bytes != 0 and not self.stream_layers:
            notes.append("`max_vram_gb` has no effect: there is no GPU (with `stream_layers` on it caps the "
                         "simulated device).")
        return notes


def bytes_from_env(name: str, unit: int, default: int) -> int:
    """A size the user set in the environment, in units of ``unit`` bytes (GIB, MIB); ``default`` if unset."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(float(value) * unit)
    except ValueError:
        raise ValueError(f"{name} must be a number of {'GiB' if unit == GIB else 'MiB'}, not {value!r}") from None
