"""Builds ComfyUI objects from the ModelManager's params stores, with core's own loaders.

Core loaders are handed the store's lazy state dict, so ComfyUI's detection, key
conversion and model classes do the work while the weights stay bound to the store.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass

import comfy.model_patcher
import comfy.sd
import folder_paths
import torch

from ..loader import LazyTensor, LoadOptions, ModelEntry, ModelFileError, ParamStore, StreamConfig, StreamEngine
from .patcher import StreamModelPatcher, adopt, device_bytes

_UNET_DTYPES = {
    "default": None,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass
class CheckpointParts:
    model: StreamModelPatcher
    clip: comfy.sd.CLIP | None
    vae: comfy.sd.VAE | None


_CORE_PATCHER_LOCK = threading.Lock()


@contextlib.contextmanager
def _non_dynamic_core():
    """Core builds plain ModelPatchers while the pack builds a model from its store.

    The pack manages every part it loads (placement, budget, streaming; see README), so
    upstream's DynamicVRAM must not: a dynamic patcher makes core load the state dict with
    ``assign=True``, which would adopt the store's placeholders as the parameters. Core's
    loaders take ``disable_dynamic``, but upstream's VAE takes none and
    ``load_state_dict_guess_config`` does not pass it on to the VAE, so the class core hands
    out (``CoreModelPatcher``, absent in 0.3.75) is pointed at the plain one for the build."""
    if not hasattr(comfy.model_patcher, "CoreModelPatcher"):
        yield
        return
    with _CORE_PATCHER_LOCK:
        core = comfy.model_patcher.CoreModelPatcher
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcher
        try:
            yield
        finally:
            comfy.model_patcher.CoreModelPatcher = core


def _metadata(store: ParamStore) -> dict | None:
    return store.file.header.metadata or None


def _finish_build(store: ParamStore, what: str, *modules: torch.nn.Module) -> None:
    """Check what core built, and make a part's lazy weights read before anything takes its
    state dict: saving (CheckpointSave, VAE/CLIP ``get_sd``) may come before its first load."""
    if any(isinstance(p, LazyTensor) for m in modules for p in m.parameters()):
        raise RuntimeError(f"ComfyUI kept unread placeholders in {what} from `{store.file.path}`; "
                           "this model format is not supported by StreamLoader yet, use the core loader")
    for module in modules:
        module.register_state_dict_pre_hook(lambda m, prefix, keep_vars: store.load_module(m))


def build_checkpoint(entry: ModelEntry) -> CheckpointParts:
    store = entry.store
    with _non_dynamic_core():
        out = comfy.sd.load_state_dict_guess_config(
            store.lazy_state_dict(), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"), metadata=_metadata(store))
    if out is None or out[0] is None:
        raise ModelFileError(store.file.path, "ComfyUI does not recognise a diffusion model in it",
                             "Pick a checkpoint that core `Load Checkpoint` accepts.")
    model, clip, vae = adopt(out[0], entry), out[1], out[2]
    modules = [model.model]
    if clip is not None:
        clip.patcher = adopt(clip.patcher, entry)
        modules.append(clip.cond_stage_model)
    if vae is not None:
        vae.patcher = adopt(vae.patcher, entry)
        modules.append(vae.first_stage_model)
    _finish_build(store, "the checkpoint", *modules)
    _attach_engine(entry, model, modules[1:])
    return CheckpointParts(model, clip, vae)


def build_diffusion_model(entry: ModelEntry, options: LoadOptions) -> StreamModelPatcher:
    store = entry.store
    model_options = {}
    if _UNET_DTYPES[options.weight_dtype] is not None:
        model_options["dtype"] = _UNET_DTYPES[options.weight_dtype]
    if options.weight_dtype == "fp8_e4m3fn_fast":
        model_options["fp8_optimizations"] = True
    with _non_dynamic_core():
        patcher = comfy.sd.load_diffusion_model_state_dict(store.lazy_state_dict(), model_options=model_options,
                                                           metadata=_metadata(store))
    if patcher is None:
        raise ModelFileError(store.file.path, "ComfyUI does not recognise a diffusion model in it",
                             "Pick a file that core `Load Diffusion Model` accepts.")
    ours = adopt(patcher, entry)
    _finish_build(store, "the diffusion model", ours.model)
    _attach_engine(entry, ours, [])
    return ours


def _attach_engine(entry: ModelEntry, model: StreamModelPatcher, others: list[torch.nn.Module]) -> None:
    """Pack the diffusion model's blocks for streaming, before any weight is read into them."""
    engine = StreamEngine(model.model, model.model.diffusion_model, entry.store.pending_params(),
                          config=StreamConfig.from_env())
    if engine.units:
        entry.engine = engine
        entry.on_evict.append(engine.close)

    def held() -> int:
        own = engine.held_bytes if engine.attached is not None else device_bytes(model.model)
        return own + device_bytes(*others)

    entry.device_bytes = held


def build_vae(entry: ModelEntry) -> comfy.sd.VAE:
    store = entry.store
    with _non_dynamic_core():
        vae = comfy.sd.VAE(sd=store.lazy_state_dict(), metadata=_metadata(store))
    if getattr(vae, "first_stage_model", None) is None:
        raise ModelFileError(store.file.path, "ComfyUI does not recognise a VAE in it",
                             "Pick a file that core `Load VAE` accepts.")
    vae.patcher = adopt(vae.patcher, entry)
    _finish_build(store, "the VAE", vae.first_stage_model)
    entry.device_bytes = lambda: device_bytes(vae.first_stage_model)
    return vae


def vae_with_options(vae: comfy.sd.VAE, options: LoadOptions) -> comfy.sd.VAE:
    """A shallow copy of a held VAE whose patcher carries this node's options."""
    out = copy.copy(vae)
    out.patcher = vae.patcher.with_options(options)
    return out


def clip_with_options(clip: comfy.sd.CLIP, options: LoadOptions) -> comfy.sd.CLIP:
    out = clip.clone()
    out.patcher = clip.patcher.with_options(options)
    return out
