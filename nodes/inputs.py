"""Shared inputs of the loader nodes, and their conversion into one LoadOptions."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loader import LoadOptions


def offload_input() -> io.Boolean.Input:
    return io.Boolean.Input("offload_to_cpu", default=True, tooltip=(
        "Keep the weights in RAM and copy them to the GPU when used (on: ComfyUI may free the GPU copy "
        "between uses). Off: the weights stay on the GPU once loaded."))


def stream_input() -> io.Boolean.Input:
    return io.Boolean.Input("stream_layers", default=False, tooltip=(
        "Stream layers that do not fit the VRAM budget from RAM at every step. "
        "Needs `offload_to_cpu` on and a `max_vram_gb` budget."))


def budget_input() -> io.Float.Input:
    return io.Float.Input("max_vram_gb", default=0.0, min=-1024.0, max=1024.0, step=0.25, tooltip=(
        "VRAM budget for this model in GiB: 0 = no cap, > 0 = cap, < 0 = auto "
        "(free VRAM minus that many GiB)."))


def eager_input() -> io.Boolean.Input:
    return io.Boolean.Input("eager_load", default=False, tooltip=(
        "Read the whole file while this node runs, with a progress bar. Off: each part is read "
        "the first time it is used. Either way, later runs read nothing from disk."))


def toggle_inputs() -> list:
    return [offload_input(), stream_input(), budget_input(), eager_input()]


def to_options(**kwargs) -> LoadOptions:
    """Node inputs to LoadOptions; unknown inputs (file names) are ignored here."""
    fields = ("offload_to_cpu", "stream_layers", "max_vram_gb", "eager_load", "weight_dtype")
    return LoadOptions.from_ui(**{k: v for k, v in kwargs.items() if k in fields})
