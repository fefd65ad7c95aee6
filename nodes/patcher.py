"""StreamModelPatcher: the only code that touches ComfyUI's ModelPatcher internals.

ComfyUI's model management asks every MODEL/CLIP/VAE patcher to load (``partially_load``
→ ``load``) and to shrink (``partially_unload``/``detach``). Our subclass keeps that
contract, so core nodes and model management work unchanged, and adds: the ModelManager's
lazily-bound weights are read before the first load; without ``stream_layers`` the loader's
VRAM budget caps how much of the model ComfyUI places on the device; with it, the streaming
engine places the diffusion model instead (ComfyUI still patches the weights), reports its
device bytes as the loaded size, shrinks on ``partially_unload`` and lets go on unpatch.
"""
from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch
from comfy.patcher_extension import WrappersMP

from ..loader import Device, LoadOptions, ModelEntry, StreamEngine, device_for, get_manager, resolve_budget, shapes_of
from .pinning import ComfyPinnedBook


class StreamModelPatcher(comfy.model_patcher.ModelPatcher):
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        super().__init__(model, load_device, offload_device, size, weight_inplace_update=weight_inplace_update)
        self.stream_entry: ModelEntry | None = None
        self.stream_options = LoadOptions()
        self._patching_for_host = False

    def clone(self, *args, **kwargs):
        # ModelPatcher.clone() builds self.__class__; carry our fields over (upstream adds kwargs).
        n = super().clone(*args, **kwargs)
        n.stream_entry, n.stream_options = self.stream_entry, self.stream_options
        return n

    def with_options(self, options: LoadOptions) -> "StreamModelPatcher":
        n = self.clone()
        n.stream_options = options
        if not options.offload_to_cpu:
            n.offload_device = n.load_device
        if n.stream_engine is not None and options.stream_layers and options.offload_to_cpu:
            # Only a model that may stream: each step's stats snapshot walks every parameter.
            n.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "streamloader_step", _step_of(n.stream_engine))
        return n

    @property
    def stream_engine(self) -> StreamEngine | None:
        """The streaming engine of this patcher's model (a checkpoint's CLIP and VAE have none)."""
        engine = self.stream_entry.engine if self.stream_entry is not None else None
        return engine if engine is not None and engine.root is self.model else None

    def streams_to(self, device_to) -> bool:
        o = self.stream_options
        return device_to is not None and o.stream_layers and o.offload_to_cpu and self.stream_engine is not None

    def budget_bytes(self, device: torch.device | None = None) -> int | None:
        device = device or self.load_device
        if comfy.model_management.is_device_cpu(device):
            return None
        free = comfy.model_management.get_free_memory(device)
        return resolve_budget(self.stream_options.max_vram_bytes, free, self.loaded_size())

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        # Every path that places weights (model_load, patch_model) ends here: read lazy weights first.
        if self.stream_entry is not None:
            self.stream_entry.store.load_module(self.model)
        if self.stream_engine is not None:
            self.stream_engine.detach()
        if self.streams_to(device_to):
            return self._load_streamed(device_to, lowvram_model_memory, force_patch_weights, **kwargs)
        before = self.loaded_size()
        with _weights_mode():
            result = super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, **kwargs)
        if device_to is not None and not comfy.model_management.is_device_cpu(device_to):
            get_manager().record_h2d(max(self.loaded_size() - before, 0))
        return result

    def _load_streamed(self, device_to, lowvram_model_memory, force_patch_weights, **kwargs):
        """Patch the weights (LoRA) once, into host memory, then let the engine place and stream them."""
        self._patching_for_host = True
        try:
            super().load(_HOST, 0, force_patch_weights, True, **kwargs)
        finally:
            self._patching_for_host = False
        engine = self.stream_engine
        device = device_for(torch.device(device_to), pinned=ComfyPinnedBook)
        comfy_limit = lowvram_model_memory if 0 < lowvram_model_memory < _NO_LIMIT else None
        engine.attach(device, self._stream_budget(device, comfy_limit), None,  # the engine's StreamConfig
                      comfy.model_management.throw_exception_if_processing_interrupted)
        self.stream_entry.budget_bytes = engine.figures.budget_bytes
        self.model.device = device_to
        self.model.model_loaded_weight_memory = engine.held_bytes

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kwargs):
        """For a streamed model, patched weights stay on the host, but each is computed on the
        load device, one at a time (as core does when it loads a model whole), and copied back:
        the fp32 arithmetic over every patched weight would otherwise run on the CPU."""
        # kwargs: upstream's return_weight and force_cast (saving a partially loaded model).
        if not self._patching_for_host:
            return super().patch_weight_to_device(key, device_to, inplace_update, **kwargs)
        super().patch_weight_to_device(key, self.load_device, inplace_update, **kwargs)
        weight, set_func, _ = comfy.model_patcher.get_key_weight(self.model, key)
        if set_func is None and weight.device != _HOST:
            comfy.utils.set_attr_param(self.model, key, weight.to(_HOST))

    def _stream_budget(self, device: Device, comfy_limit: float | None) -> int | None:
        """The user's budget re-clamped to what is free now (the engine's own bytes count as free),
        and to what ComfyUI's memory manager offered."""
        engine = self.stream_engine
        free = device.free_bytes() if device.kind == "simulated" else \
            comfy.model_management.get_free_memory(device.torch_device)
        budget = resolve_budget(self.stream_options.max_vram_bytes, free, engine.held_bytes)
        if comfy_limit is not None:
            budget = int(comfy_limit) if budget is None else min(budget, int(comfy_limit))
        return budget

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        engine = self.stream_engine
        streams = self.streams_to(device_to)
        if engine is not None and streams != (engine.attached is not None) and self.loaded_size() > 0:
            # stream_layers toggled on a model ComfyUI still holds: place it again.
            self.unpatch_model(self.offload_device, unpatch_weights=True)
        if streams:
            held = self.loaded_size()
            result = super().partially_load(device_to, extra_memory, force_patch_weights)
            self._reclamp(held + extra_memory if 0 < extra_memory < _NO_LIMIT else None)
            engine.begin_run()
            get_manager().publish()  # the stats show this run's figures from its start, not the last run's
            return result
        # LoadedModel.model_load asks for `extra_memory` more bytes on the device; the budget caps it.
        budget = self.budget_bytes(device_to)
        if self.stream_entry is not None:
            self.stream_entry.budget_bytes = budget
        if budget is not None:
            extra_memory = min(extra_memory, max(budget - self.loaded_size(), 0))
        return super().partially_load(device_to, extra_memory, force_patch_weights)

    def _reclamp(self, comfy_limit: float | None) -> None:
        """Re-plan a model that stayed attached when its budget changed (less free memory, a new
        cap, less room offered by ComfyUI's memory manager: ``comfy_limit``, its bytes in all)."""
        engine = self.stream_engine
        placement = engine.attached
        if placement is None:
            return
        budget = self._stream_budget(placement.device, comfy_limit)
        if budget != placement.plan.budget_bytes:
            engine.attach(placement.device, budget, placement.prefetch_depth, placement.check_interrupt)
            self.stream_entry.budget_bytes = budget
            self.model.model_loaded_weight_memory = engine.held_bytes

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        engine = self.stream_engine
        if engine is None or engine.attached is None:
            with _weights_mode():
                freed = super().partially_unload(device_to, memory_to_free, force_patch_weights)
            self._back_to_slabs(on_host_only=True)
            return freed
        freed = engine.shrink(memory_to_free)
        self.model.model_loaded_weight_memory = engine.held_bytes
        return freed

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        engine = self.stream_engine
        if not unpatch_weights or engine is None:
            with _weights_mode():
                return super().unpatch_model(device_to, unpatch_weights)
        engine.detach()  # host weights back in place before ComfyUI restores its backups
        if not _held(self.stream_entry):
            # Released (POST /streamloader/release) while ComfyUI still ran the model: the release
            # closed the engine, but this run's attach page-locked its slabs again, and nothing
            # else unregisters them before the model is dropped and their memory freed.
            engine.close()
        with _weights_mode():
            result = super().unpatch_model(None, unpatch_weights)
            if device_to is not None:
                if comfy.model_management.is_device_cpu(device_to):
                    self._back_to_slabs(on_host_only=False)
                self.model.to(device_to)
                self.model.device = device_to
        return result

    def _back_to_slabs(self, on_host_only: bool) -> None:
        """Unpatched block weights return to the engine's host slab instead of a second host copy."""
        engine = self.stream_engine
        if engine is None:
            return
        names = {id(m): n for n, m in self.model.named_modules()}
        patched = set(self.backup)

        def wanted(spec) -> bool:
            key = f"{names[id(spec.module)]}.{spec.name}"
            if key in patched or (on_host_only and spec.get().device.type != "cpu"):
                return False
            # ComfyUI's partially_unload may have page-locked the host copy this view replaces:
            # unregister it first, or it is freed while registered and its bytes stay in ComfyUI's book.
            self.unpin_weight(key)
            return True

        engine.restore_host_views(wanted)


_HOST = torch.device("cpu")
_NO_LIMIT = 1e30  # ComfyUI passes 1e32 for "load it all"


def _weights_mode():
    """The mode ComfyUI's weight moves of the pack's models run in: inference mode, always.

    ComfyUI builds models under inference mode, so their parameters are inference tensors, but it
    unloads them from the prompt worker outside it (``POST /free``, ``unload_all_models``). A move
    outside it makes new, normal tensors, and a normal tensor set as an inference parameter's data
    leaves a parameter that fails at its next use ("Inference tensors do not track version
    counter"). Moved inside it, inference parameters stay whole, and normal ones take inference
    data without complaint (see ``loader/packing.page_aligned_empty``)."""
    return torch.inference_mode()


def _held(entry: ModelEntry) -> bool:
    return any(e is entry for e in get_manager().entries())


def _step_of(engine: StreamEngine):
    """The APPLY_MODEL wrapper of a streamed model, bound to its own engine (a closure: clones and
    deep copies of the model options share it): brackets the engine's step (``engine.step``, keyed
    by the activation shapes), retries an out-of-memory step once, and publishes
    the stats snapshot when the step ends (the thread contract in loader/manager.py)."""

    def streamed_step(executor, *args, **kwargs):
        held = engine.held_bytes
        try:
            with engine.step(shapes_of(args, kwargs)):  # one model call is one streamed step
                return _retry_out_of_memory(engine, executor, *args, **kwargs)
        finally:
            if engine.attached is not None:  # a profiled step may re-plan; detached, ComfyUI's count stands
                executor.class_obj.model_loaded_weight_memory = engine.held_bytes
            if engine.held_bytes == held:  # the same placement: its figures are what changed
                get_manager().publish_step(engine)
            else:
                get_manager().publish()

    return streamed_step


def _retry_out_of_memory(engine: StreamEngine, executor, *args, **kwargs):
    """An out-of-memory error in a streamed step re-plans smaller and retries once.

    The retry runs after the ``except`` block: inside it the traceback would keep the failed
    attempt's activations alive, and the smaller placement would compete with them."""
    try:
        return executor(*args, **kwargs)
    except torch.OutOfMemoryError as error:
        failure = torch.OutOfMemoryError(str(error))
    comfy.model_management.soft_empty_cache()
    if not engine.retry_smaller(failure):
        raise failure from None
    executor.class_obj.model_loaded_weight_memory = engine.held_bytes
    return executor(*args, **kwargs)


def adopt(patcher: comfy.model_patcher.ModelPatcher, entry: ModelEntry) -> StreamModelPatcher:
    """Wrap the module of a patcher made by core loaders in our subclass."""
    _forget_loaded(patcher)
    # The size now: taking it later would read the lazy weights (a state dict reads them).
    ours = StreamModelPatcher(patcher.model, patcher.load_device, patcher.offload_device, patcher.model_size())
    ours.stream_entry = entry
    return ours


def _forget_loaded(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Unload a core patcher we replace (CLIP loads itself at construction), so that ComfyUI
    does not keep a dead entry for it and warn of a memory leak (0.3.75 has no
    unload_model_and_clones)."""
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        if loaded[i].model is patcher:
            loaded.pop(i).model_unload()


def device_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of these modules' parameters that sit on an accelerator."""
    return sum(p.nbytes for m in modules for p in m.parameters() if p.device.type != "cpu")
