"""Block discovery: the repeated blocks of a diffusion model, in execution order.

The blocks are what the engine streams; everything outside them (embedders, final
layers, norms) stays resident on the device. ComfyUI's model families name their block
lists; any other model falls back to its longest list of same-type modules.
"""
from __future__ import annotations

from torch import nn

# Attribute names of the block lists, in the order the model runs them.
FAMILY_BLOCK_LISTS: tuple[tuple[str, ...], ...] = (
    ("input_blocks", "middle_block", "output_blocks"),  # SD1.x, SD2, SDXL UNet
    ("double_blocks", "single_blocks"),  # Flux, Chroma, HunyuanVideo
    ("double_stream_blocks", "single_stream_blocks"),  # HiDream
    ("double_layers", "single_layers"),  # AuraFlow
    ("joint_blocks",),  # SD3 / MMDiT
    ("transformer_blocks",),  # Qwen-Image, LTXV
    ("blocks",),  # Wan
    ("layers",),  # Lumina 2, Z-Image
)


def discover_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks as (qualified name, module), in execution order; [] if none."""
    for names in FAMILY_BLOCK_LISTS:
        if all(isinstance(getattr(model, n, None), nn.Module) for n in names) and isinstance(
                getattr(model, names[0]), nn.ModuleList):
            return [block for n in names for block in _members(n, getattr(model, n))]
    return _longest_uniform_list(model)


def _members(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.ModuleList):
        return [(f"{name}.{i}", child) for i, child in enumerate(module)]
    return [(name, module)]


def _longest_uniform_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len(module) >= 2 \
                and len({type(child) for child in module}) == 1:
            best = _members(name, module)
    return best
