"""The VRAM budget: from the user's ``max_vram`` setting and live free memory to bytes."""
from __future__ import annotations


def resolve_budget(max_vram_bytes: int, free_bytes: int, held_bytes: int = 0) -> int | None:
    """Bytes of device memory a model may hold, or None for no cap.

    Args:
        max_vram_bytes: 0 = no cap, > 0 = a cap, < 0 = free memory minus ``-max_vram_bytes``.
        free_bytes: device memory free right now.
        held_bytes: device bytes the model already holds; they count as available to it.
    Returns:
        The cap, re-clamped to what is available, so a cap never exceeds the device.
    """
    if max_vram_bytes == 0:
        return None
    available = max(free_bytes + held_bytes, 0)
    if max_vram_bytes > 0:
        return min(max_vram_bytes, available)
    return max(available + max_vram_bytes, 0)
