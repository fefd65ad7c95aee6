"""Page-locked (pinned) host memory: who registers it, and the one cap it is held under.

Host-to-device copies run at full speed only from page-locked memory, and page-locked
memory is taken from everything else on the host, so it is capped. ComfyUI keeps its own
book of what it pinned (``TOTAL_PINNED_MEMORY`` under ``MAX_PINNED_MEMORY``); when the
pack runs inside ComfyUI on a GPU, its slabs are registered through that book (see
``nodes/pinning.py``), so both sides share one cap and the sum never exceeds it. A
`PinnedBook` is that interface: the engine's devices ask it to register and unregister
their slabs, and it reports the cap and each side's share.
"""
from __future__ import annotations

import os

import torch

from .options import GIB, bytes_from_env


PINNED_CAP_ENV = "STREAMLOADER_PINNED_CAP_GB"
_DEFAULT_PINNED_SHARE = 0.5


class PinnedBook:
    """Pinned host bytes registered by the pack, under a cap shared with others' pinned bytes."""

    def __init__(self, cap_bytes: int | None = None):
        self._cap_bytes = default_pinned_cap() if cap_bytes is None else cap_bytes
        self.own_bytes = 0
        # Each registered buffer, by address, held until it is unregistered: memory freed while
        # registered stays registered in CUDA's books, and a later host buffer at that address
        # fails every copy ("CUDA error: invalid argument"). A buffer whose owner forgot to
        # unregister it stays alive here instead, and counted in `own_bytes`.
        self._registered: dict[int, torch.Tensor] = {}

    @property
    def cap_bytes(self) -> int:
        return self._cap_bytes

    def others_bytes(self) -> int:
        """Bytes page-locked by others (ComfyUI) under the same cap."""
        return 0

    def register(self, host: torch.Tensor) -> bool:
        """Page-lock ``host`` if the cap allows; False leaves it pageable (slower copies)."""
        if self.own_bytes + self.others_bytes() + host.nbytes > self.cap_bytes or not self._register(host):
            return False
        self._registered[host.data_ptr()] = host
        self.own_bytes += host.nbytes
        return True

    def unregister(self, host: torch.Tensor) -> None:
        self._unregister(host)
        self._registered.pop(host.data_ptr(), None)
        self.own_bytes -= host.nbytes

    def holds(self, host: torch.Tensor) -> bool:
        """Whether ``host`` starts a buffer this book registered (and has not unregistered)."""
        return host.data_ptr() in self._registered

    def report(self) -> dict:
        return {"pinned_bytes": self.own_bytes, "pinned_by_comfyui_bytes": self.others_bytes(),
                "pinned_cap_bytes": self.cap_bytes}

    # Subclasses: the registration itself. Here: bookkeeping only (the simulated device).
    def _register(self, host: torch.Tensor) -> bool:
        return True

    def _unregister(self, host: torch.Tensor) -> None:
        pass


class CudaPinnedBook(PinnedBook):
    """Registers with CUDA directly: outside ComfyUI (the benchmark, plain pytest)."""

    def _register(self, host: torch.Tensor) -> bool:
        # cudaHostRegister on an existing buffer: 0.2 s per 4 GiB on an H200, against 1.5 s
        # for a fresh pinned allocation (same call as ComfyUI's pin_memory).
        if host.is_pinned():  # already page-locked (by ComfyUI): registering again would fail
            return False
        ok = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.nbytes, 1)) == 0
        if not ok:
            clear_cuda_error()
        return ok

    def _unregister(self, host: torch.Tensor) -> None:
        if int(torch.cuda.cudart().cudaHostUnregister(host.data_ptr())) != 0:
            clear_cuda_error()


def clear_cuda_error() -> None:
    """A failed runtime call leaves CUDA's last error set, and torch would report it at the next
    kernel launch as if that kernel had failed. torch binds no cudaGetLastError, so, as upstream
    ComfyUI's ``discard_cuda_async_error`` does, launch a tiny kernel and synchronize: the stale
    error surfaces there, where it is known and dropped (the failed call already answered)."""
    try:
        one = torch.ones(1, dtype=torch.uint8, device="cuda")
        _ = one + one
        torch.cuda.synchronize()
    except RuntimeError:
        pass


def default_pinned_cap() -> int:
    """STREAMLOADER_PINNED_CAP_GB, or half the host's RAM."""
    share = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _DEFAULT_PINNED_SHARE)
    return bytes_from_env(PINNED_CAP_ENV, GIB, share)
