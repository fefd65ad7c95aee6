"""The params store: one model file's tensors, read into the tensors that hold them.

ComfyUI builds its models from a state dict: it reads shapes and dtypes to detect the
architecture, renames keys, then ``copy_``s each value into a parameter. We hand it a
state dict of `LazyTensor` placeholders (meta tensors that know their place in the file).
Reading a placeholder's shape costs nothing; ``param.copy_(placeholder)`` records a
binding instead of copying; any other operation reads that one tensor on the spot. The
store then fills the bound parameters from disk, either at load (eager) or when the model
is first used (lazy), reading each tensor at most once and straight into the parameter's
own host memory when the dtypes match.
"""
from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .safetensors_file import ModelFileError, SafetensorsFile, TensorEntry

# Readers of an eager load: up to 8 (page-cache reads scale to about that many), leaving one
# core to ComfyUI's event loop and prompt worker, so the server keeps answering during a load.
_READ_THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))

# Tensor functions that only look at metadata; everything else needs the bytes.
_METADATA_FUNCTIONS = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.is_meta.__get__, torch.Tensor.layout.__get__,
    torch.Tensor.requires_grad.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.is_sparse.__get__,
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.element_size, torch.Tensor.__len__, torch.Tensor.is_floating_point,
    torch.Tensor.is_complex, torch.Tensor.__hash__,
}


class LazyTensor(torch.Tensor):
    """A placeholder for one tensor of a file: metadata is free, data is read on demand."""

    _store: "ParamStore"
    _entry: TensorEntry

    @staticmethod
    def __new__(cls, store: "ParamStore", entry: TensorEntry):
        t = torch.Tensor._make_subclass(cls, torch.empty(entry.shape, dtype=entry.dtype, device="meta"))
        t._store, t._entry = store, entry
        return t

    def __repr__(self) -> str:
        return f"LazyTensor({self._entry.name!r}, {tuple(self._entry.shape)}, {self._entry.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_FUNCTIONS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.copy_ and isinstance(args[1], LazyTensor) and not isinstance(args[0], LazyTensor):
            return args[1]._store.bind(args[0], args[1]._entry)
        real_args = torch.utils._pytree.tree_map(_read_if_lazy, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*real_args[0], **real_args[1])


def _read_if_lazy(value):
    return value._store.read_now(value._entry) if isinstance(value, LazyTensor) else value


@dataclass
class _Binding:
    target: torch.Tensor  # the Parameter that will hold the tensor; filled through .data
    entry: TensorEntry
    loaded: bool = False


class ParamStore:
    """Tensors of one safetensors file, bound to the parameters that will hold them."""

    def __init__(self, file: SafetensorsFile):
        self.file = file
        self._bindings: list[_Binding] = []
        self._read_now_bytes = 0
        self._unread = 0  # bindings not read yet: a first use of a read store costs nothing
        # The first binding refused while ComfyUI built the model; torch's load_state_dict
        # folds it into its own message, so the manager raises this one instead.
        self.refused: ModelFileError | None = None
        self._lock = threading.RLock()

    def lazy_state_dict(self) -> dict[str, LazyTensor]:
        """A state dict of placeholders, one per tensor in the file, for ComfyUI to build from."""
        return {name: LazyTensor(self, entry) for name, entry in self.file.header.tensors.items()}

    def bind(self, target: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
        """Record that ``target`` receives ``entry``; buffers are read at once (see below)."""
        if tuple(target.shape) != entry.shape:
            raise ValueError(f"`{entry.name}` has shape {entry.shape} in the file but {tuple(target.shape)} in the model")
        if isinstance(target, torch.nn.Parameter) and target.is_floating_point() and not entry.dtype.is_floating_point:
            self.refused = self.refused or ModelFileError(
                self.file.path, f"tensor `{entry.name}` is stored as {entry.dtype} but the model's weights are "
                f"floating point ({target.dtype}); the file does not match the architecture ComfyUI detected")
            raise self.refused
        if not isinstance(target, torch.nn.Parameter):
            # Module.to() replaces buffer tensors instead of their .data, which would orphan a
            # binding; buffers are small, so read them now.
            _copy_into(target, self.read_now(entry))
            return target
        self._bindings.append(_Binding(target, entry))
        self._unread += 1
        return target

    def read_now(self, entry: TensorEntry) -> torch.Tensor:
        tensor = self.file.read(entry)
        with self._lock:
            self._read_now_bytes += entry.nbytes
        return tensor

    @property
    def pending_bytes(self) -> int:
        return sum(b.entry.nbytes for b in self._bindings if not b.loaded)

    def pending_params(self) -> frozenset[int]:
        """Ids of the bound parameters not read yet (their memory holds nothing worth copying)."""
        with self._lock:
            return frozenset(id(b.target) for b in self._bindings if not b.loaded)

    @property
    def bound_bytes(self) -> int:
        """Bytes of the parameters this store fills, in the model's own dtype (host-resident once read)."""
        return sum(b.target.nbytes for b in self._bindings)

    @property
    def loaded_host_bytes(self) -> int:
        return sum(b.target.nbytes for b in self._bindings if b.loaded and b.target.device.type == "cpu")

    @property
    def is_loaded(self) -> bool:
        return all(b.loaded for b in self._bindings)

    def load_all(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Read every pending tensor into its parameter, in parallel; returns the bytes read.

        Args:
            progress: called as ``progress(done_bytes, total_bytes)`` after each tensor.
        """
        return self._load(lambda b: True, progress)

    def load_module(self, module: torch.nn.Module) -> int:
        """Read the pending tensors of one module (a checkpoint's UNet, CLIP or VAE) on its first use."""
        if not self._unread:
            return 0
        wanted = {id(p) for p in module.parameters()}
        return self._load(lambda b: id(b.target) in wanted, None)

    def _load(self, wanted: Callable[[_Binding], bool], progress: Callable[[int, int], None] | None) -> int:
        with self._lock:  # held throughout, so that concurrent first uses read each tensor once
            pending = [b for b in self._bindings if not b.loaded and wanted(b)]
            total = sum(b.entry.nbytes for b in pending)
            try:
                if pending:
                    self._read_pending(pending, total, progress)
            finally:
                self._unread = sum(not b.loaded for b in self._bindings)
        return total

    def _read_pending(self, pending: list[_Binding], total: int, progress) -> None:
        """Read in parallel. ``progress`` runs on the calling thread and may raise (ComfyUI's
        progress hook raises on an interrupt): the readers then skip what they have not
        started, and those tensors stay pending, to be read on first use. The readers only look
        at their own stop flag; ComfyUI's interrupt flag is left to the calling thread."""
        done, stop = 0, threading.Event()

        def read(binding: _Binding) -> _Binding:
            return binding if stop.is_set() else self._load_binding(binding, fd)

        with self.file.opened() as fd, ThreadPoolExecutor(_READ_THREADS) as pool:
            try:
                for binding in pool.map(read, pending):
                    done += binding.entry.nbytes
                    if progress is not None:
                        progress(done, total)
            except BaseException:
                stop.set()
                raise

    def _load_binding(self, binding: _Binding, fd: int) -> _Binding:
        data = binding.target.data
        if data.device.type == "cpu" and data.dtype == binding.entry.dtype and data.is_contiguous():
            self.file.read_into(binding.entry, data, fd)
        else:
            self._read_converted(binding.entry, data, fd)
        binding.loaded = True
        return binding

    def _read_converted(self, entry: TensorEntry, target: torch.Tensor, fd: int) -> None:
        """Read a tensor the parameter holds in another dtype (or off the host) through scratch
        memory mapped for this read alone, which goes back to the OS when it is unmapped. A heap
        temporary made on a reader thread would stay in that thread's malloc arena: loading a
        3 GiB fp16 file into fp32 weights left hundreds of MiB of RSS behind after release."""
        if entry.nbytes == 0:
            return
        with mmap.mmap(-1, entry.nbytes) as scratch:
            tensor = torch.frombuffer(scratch, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)
            self.file.read_into(entry, tensor, fd)
            _copy_into(target, tensor)
            del tensor  # unmapping needs the last view gone


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
        target.copy_(source)
