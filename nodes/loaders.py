"""Loader nodes: resolve the file, build LoadOptions, ask the ModelManager, wrap the result."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ..loader import GIB, LoadOptions, get_manager
from ..loader.options import WEIGHT_DTYPES
from ..loader.safetensors_file import FileIdentity
from . import bridge
from .inputs import eager_input, offload_input, to_options, toggle_inputs
from .sampling import figures_ui

_MIB = 1024**2
_MANAGED_BY_THE_PACK = ("Every part it outputs is placed by StreamLoader (its budget, offload and streaming), "
                        "not by ComfyUI's DynamicVRAM, also where DynamicVRAM is on.")


def _progress_bar():
    """A ComfyUI progress bar fed in MiB by eager loads."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(max(total // _MIB, 1))
        bar.update_absolute(done // _MIB)

    return update


def _load(folder: str, name: str, kind: str, options: LoadOptions, build) -> tuple:
    """(the manager's entry, what the node should say about this load)."""
    path = folder_paths.get_full_path_or_raise(folder, name)
    notes: list[str] = []
    entry = get_manager().get_or_load(path, kind, options, build, progress=_progress_bar(), notes=notes)
    return entry, notes


def _listed(folder: str, input_name: str, name) -> str | None:
    """At POST /prompt, before anything is read: why ``name`` is refused, or None if it is one of
    the folder's listed files (so it resolves inside the model folders)."""
    if name in folder_paths.get_filename_list(folder):
        return None
    return (f"`{input_name}` {name!r} is not in the list of {folder} files; names are relative to the "
            f"{folder} model folders (absolute paths and `..` are refused). Pick a listed file, or put the "
            f"file in a {folder} folder and refresh the list.")


def _validation(*problems: str | None) -> bool | str:
    """What a V3 ``validate_inputs`` returns: True, or the problems (ComfyUI answers 400 with them).
    ComfyUI 0.3.75 does not check V3 combo values itself."""
    found = [p for p in problems if p is not None]
    return " ".join(found) if found else True


def _file_fingerprint(folder: str, name: str):
    """What ComfyUI compares between runs to decide whether a loader runs again: the file's
    identity, so that a file replaced or modified on disk is never served from ComfyUI's cache."""
    path = folder_paths.get_full_path(folder, name)
    try:
        identity = FileIdentity.of(path)
    except (OSError, TypeError):  # missing: the loader runs and says so
        return name
    return (identity.path, identity.size, identity.mtime_ns, identity.inode)


def _notes_ui(options: LoadOptions, entry, load_notes: list[str]) -> dict:
    has_gpu = not comfy.model_management.is_device_cpu(comfy.model_management.get_torch_device())
    held = entry.store.loaded_host_bytes / GIB
    line = f"held: {held:.2f} GiB in RAM" + (" (reads on first use)" if not entry.store.is_loaded else "")
    return figures_ui([line], load_notes + options.notes(has_gpu))


class StreamLoaderCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamLoaderCheckpoint", display_name="Load Checkpoint (Stream)", category="loaders/stream",
            description="Loads a checkpoint into the process-wide StreamLoader cache; later runs read nothing from disk. "
                        + _MANAGED_BY_THE_PACK,
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints")), *toggle_inputs()],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name) -> bool | str:
        return _validation(_listed("checkpoints", "ckpt_name", ckpt_name))

    @classmethod
    def fingerprint_inputs(cls, ckpt_name, **toggles):
        return _file_fingerprint("checkpoints", ckpt_name)

    @classmethod
    def execute(cls, ckpt_name, **toggles) -> io.NodeOutput:
        options = to_options(**toggles)
        entry, notes = _load("checkpoints", ckpt_name, "checkpoint", options, bridge.build_checkpoint)
        parts = entry.value
        clip = bridge.clip_with_options(parts.clip, options) if parts.clip is not None else None
        vae = bridge.vae_with_options(parts.vae, options) if parts.vae is not None else None
        return io.NodeOutput(parts.model.with_options(options), clip, vae, ui=_notes_ui(options, entry, notes))


class StreamLoaderDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamLoaderDiffusionModel", display_name="Load Diffusion Model (Stream)", category="loaders/stream",
            description="Loads a diffusion model into the process-wide StreamLoader cache. " + _MANAGED_BY_THE_PACK,
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models")),
                    io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES)), *toggle_inputs()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, unet_name, weight_dtype) -> bool | str:
        dtype = None if weight_dtype in WEIGHT_DTYPES else \
            f"`weight_dtype` {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}; pick one of those."
        return _validation(_listed("diffusion_models", "unet_name", unet_name), dtype)

    @classmethod
    def fingerprint_inputs(cls, unet_name, **toggles):
        return _file_fingerprint("diffusion_models", unet_name)

    @classmethod
    def execute(cls, unet_name, **toggles) -> io.NodeOutput:
        options = to_options(**toggles)
        entry, notes = _load("diffusion_models", unet_name, "diffusion_model", options,
                             lambda e: bridge.build_diffusion_model(e, options))
        return io.NodeOutput(entry.value.with_options(options), ui=_notes_ui(options, entry, notes))


class StreamLoaderVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamLoaderVAE", display_name="Load VAE (Stream)", category="loaders/stream",
            description="Loads a VAE into the process-wide StreamLoader cache. " + _MANAGED_BY_THE_PACK,
            inputs=[io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae")),
                    offload_input(), eager_input()],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def validate_inputs(cls, vae_name) -> bool | str:
        return _validation(_listed("vae", "vae_name", vae_name))

    @classmethod
    def fingerprint_inputs(cls, vae_name, **toggles):
        return _file_fingerprint("vae", vae_name)

    @classmethod
    def execute(cls, vae_name, **toggles) -> io.NodeOutput:
        options = to_options(**toggles)
        entry, notes = _load("vae", vae_name, "vae", options, bridge.build_vae)
        return io.NodeOutput(bridge.vae_with_options(entry.value, options), ui=_notes_ui(options, entry, notes))
