"""Host packing: a model's streamed tensors packed into page-aligned host slabs, one per unit.

A unit is a block, or a chunk of a large block: the unit of a copy. At build time each unit's
parameters are packed into one contiguous host slab (the params store then reads the file
straight into it); a ``TensorSpec`` names one tensor's owner and its place in a packed buffer,
so a unit's parameters can be re-pointed at the slab, at a device copy, or at a patched copy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .device import Device

# Slab offsets on page boundaries: any dtype aligns, and per-tensor pinning (ComfyUI's
# lowvram path, when streaming is off) never finds a page shared with another tensor.
_ALIGN = 4096


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def page_aligned_empty(nbytes: int) -> torch.Tensor:
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
        # outside it is a normal tensor (see page_aligned_empty).
        with torch.inference_mode():
            return self._view(base)

    def _view(self, base: torch.Tensor) -> torch.Tensor:
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


def layout(tensors: list[tuple[nn.Module, str, torch.Tensor, bool]]) -> tuple[list[TensorSpec], int]:
    specs, offset = [], 0
    for module, name, t, is_buffer in tensors:
        specs.append(TensorSpec(module, name, offset, t.dtype, t.shape, t.nbytes, is_buffer))
        offset = _aligned(offset + t.nbytes)
    return specs, offset


class Unit:
    """A block, or a chunk of a large block: its parameters packed into one contiguous host slab,
    the unit of a copy."""

    def __init__(self, name: str, block: nn.Module, modules: list[nn.Module], pending: frozenset[int] = frozenset(),
                 sources: dict[tuple[int, str], torch.Tensor] | None = None):
        """
        Args:
            block: the block this unit belongs to.
            modules: the modules whose own parameters the unit holds (the whole block, or a chunk).
            pending: ids of parameters not read yet (their memory holds nothing worth copying).
            sources: the bytes to pack, by ``(id(module), name)``, instead of the parameters' own
                (``repack``: the old slabs); a parameter that no longer holds its source (patched)
                keeps what it holds.
        """
        self.name, self.module, self.modules = name, block, modules
        params = [(m, n, p, False) for m in modules for n, p in m._parameters.items() if p is not None]
        self.specs, self.nbytes = layout(params)
        self.slab = page_aligned_empty(self.nbytes)
        self.pinned_on: Device | None = None  # the device that page-locked the slab
        for spec, (module, name, p, _) in zip(self.specs, params):
            view = spec.view(self.slab)
            source = p.data if sources is None else sources[(id(module), name)]
            if id(p) not in pending:
                with torch.inference_mode():
                    view.copy_(source)
            if p.data.data_ptr() == source.data_ptr():
                p.data = view

    def unpin(self) -> None:
        """Undo the slab's page-locking, if a device did it."""
        if self.pinned_on is not None:
            self.pinned_on.unpin(self.slab)
            self.pinned_on = None

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
        patched = page_aligned_empty(self.nbytes)
        for spec in self.specs:
            current = spec.get().data
            if current.dtype != spec.dtype or current.shape != spec.shape:
                raise ValueError(f"`{self.name}`: a patch changed `{spec.name}` to {current.dtype} "
                                 f"{tuple(current.shape)}; streaming needs {spec.dtype} {tuple(spec.shape)}")
            with torch.inference_mode():
                spec.view(patched).copy_(current)
        return patched

    def views(self, base: torch.Tensor) -> list[torch.Tensor]:
        """Every spec's view of ``base`` (a slab or an extent of the ring), in inference mode as
        ``TensorSpec.view`` makes one (outside it, a dtype view of an inference buffer is a normal
        tensor), entered once for the unit: entering it costs as much as a view, about 5 us."""
        with torch.inference_mode():
            return [spec._view(base) for spec in self.specs]

    def point(self, base: torch.Tensor, views: list[torch.Tensor] | None = None) -> None:
        for spec, view in zip(self.specs, views or self.views(base)):
            spec.point(view)


def split_block(block: nn.Module, chunk_bytes: int, first_call: dict[int, int] | None = None) -> list[list[nn.Module]]:
    """The block's parameter-holding modules, in order, as one chunk or (over 2 x chunk_bytes)
    as consecutive chunks of about ``chunk_bytes`` each (a larger module is a chunk alone).

    The order is the registration order, or with ``first_call`` (each module's first call in a
    step, by id) the call order: a chunk then holds layers that run one after another, so it is
    entered once a step (ComfyUI's MMDiT joint block registers its context layers before its
    image layers, and calls them interleaved). Modules never called go last, in registration order.

    In a split block, modules under chunk_bytes / 64 (norm scales, biases of their own) stay
    out of every chunk, so resident: attention reads its q/k norms between the qkv and proj
    layers, and a chunk holding them would be entered twice a step."""
    holders = [m for m in block.modules() if any(p is not None for p in m._parameters.values())]
    if first_call is not None:
        holders.sort(key=lambda m: first_call.get(id(m), len(first_call)))
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


def repack(name: str, units: list[Unit], chunks: list[list[nn.Module]]) -> list[Unit]:
    """Block ``name``'s ``units`` packed again as ``chunks`` (the same modules, grouped otherwise): the
    new slabs are filled from the old ones, which hold the unpatched bytes whatever the model holds now."""
    block = units[0].module
    sources = {(id(s.module), s.name): s.view(u.slab) for u in units for s in u.specs}
    return [Unit(f"{name}[{k}]", block, modules, sources=sources) for k, modules in enumerate(chunks)]


def restore_host_views(units: list[Unit], wanted: Callable[[TensorSpec], bool]) -> int:
    """Point the ``wanted`` parameters of ``units`` that no longer view their slab back at it
    (when dtype and shape still match); returns how many were asked for."""
    moved = [(u, s) for u in units for s in u.specs if not s.holds(u.slab) and wanted(s)]
    for unit, spec in moved:
        current = spec.get()
        if current.dtype == spec.dtype and current.shape == spec.shape:
            spec.point(spec.view(unit.slab))
    return len(moved)
