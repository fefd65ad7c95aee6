"""StreamModelPatcher: the only code that touches ComfyUI's ModelPatcher internals.

ComfyUI's model management asks every MODEL/CLIP/VAE patcher to load (``partially_load``
→ ``load``) and to shrink (``partially_unload``/``detach``). Our subclass keeps that
contract, so core nodes and model management work unchanged, and adds two things: the
ModelManager's lazily-bound weights are read before the first load, and the loader's VRAM
budget caps how much of the model ComfyUI places on the device.
"""
from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import torch

from ..loader import LoadOptions, ModelEntry, get_manager, resolve_budget


class StreamModelPatcher(comfy.model_patcher.ModelPatcher):
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        super().__init__(model, load_device, offload_device, size, weight_inplace_update=weight_inplace_update)
        self.stream_entry: ModelEntry | None = None
        self.stream_options = LoadOptions()

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
        return n

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
        before = self.loaded_size()
        result = super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, **kwargs)
        if device_to is not None and not comfy.model_management.is_device_cpu(device_to):
            get_manager().record_h2d(max(self.loaded_size() - before, 0))
        return result

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        # LoadedModel.model_load asks for `extra_memory` more bytes on the device; the budget caps it.
        budget = self.budget_bytes(device_to)
        if self.stream_entry is not None:
            self.stream_entry.budget_bytes = budget
        if budget is not None:
            extra_memory = min(extra_memory, max(budget - self.loaded_size(), 0))
        return super().partially_load(device_to, extra_memory, force_patch_weights)


def adopt(patcher: comfy.model_patcher.ModelPatcher, entry: ModelEntry) -> StreamModelPatcher:
    """Wrap the module of a patcher made by core loaders in our subclass."""
    _forget_loaded(patcher)
    ours = StreamModelPatcher(patcher.model, patcher.load_device, patcher.offload_device)
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
