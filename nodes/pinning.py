"""The pack's pinned slabs, registered in ComfyUI's own pinned-memory book.

ComfyUI counts what it page-locks in ``TOTAL_PINNED_MEMORY`` under ``MAX_PINNED_MEMORY``
(0.3.75: 95 % of RAM; upstream: about 40-90 %, and it evicts other models' pins to make
room). Slabs pinned outside that book would let the two sides overcommit the host, so on
a GPU the pack registers its slabs through ``comfy.model_management.pin_memory``: ComfyUI
sees them in its total, its eviction makes room for them, and one cap holds for both.
"""
from __future__ import annotations

import comfy.model_management as mm
import torch

from ..loader.pinning import PinnedBook, clear_cuda_error


class ComfyPinnedBook(PinnedBook):
    """Pins through ComfyUI, under the smaller of ComfyUI's cap and the pack's own."""

    @property
    def cap_bytes(self) -> int:
        return max(min(super().cap_bytes, int(mm.MAX_PINNED_MEMORY)), 0)

    def others_bytes(self) -> int:
        return max(int(mm.TOTAL_PINNED_MEMORY) - self.own_bytes, 0)

    def register(self, host: torch.Tensor) -> bool:
        make_room = getattr(mm, "ensure_pin_registerable", None)  # upstream: evicts ComfyUI's own pins
        if make_room is not None:
            make_room(host.nbytes)
        return super().register(host)

    def _register(self, host: torch.Tensor) -> bool:
        # ComfyUI pins only tensors whose type is named Parameter (0.3.75) or Tensor (upstream):
        # a Parameter view of the slab is accepted by both, at the slab's address and size.
        if mm.pin_memory(_as_parameter(host)):
            return True
        if not hasattr(mm, "discard_cuda_async_error"):
            # 0.3.75 leaves a failed cudaHostRegister's error set, for the next kernel launch to
            # report as its own; upstream drops it itself. The cap was checked before this call,
            # so a refusal here is that failure (or a slab already page-locked, which sets none).
            clear_cuda_error()
        return False

    def _unregister(self, host: torch.Tensor) -> None:
        mm.unpin_memory(_as_parameter(host))


def _as_parameter(host: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(host, requires_grad=False)
