"""ComfyUI nodes of StreamLoader: thin adapters over the engine in `loader/`."""
from __future__ import annotations

import sys

from comfy_api.v0_0_2 import ComfyExtension, io

from .loaders import StreamLoaderCheckpoint, StreamLoaderDiffusionModel, StreamLoaderVAE
from .sampling import StreamLoaderKSampler, StreamLoaderVAEDecode, StreamLoaderVAEEncode

NODES: list[type[io.ComfyNode]] = [
    StreamLoaderCheckpoint,
    StreamLoaderDiffusionModel,
    StreamLoaderVAE,
    StreamLoaderKSampler,
    StreamLoaderVAEDecode,
    StreamLoaderVAEEncode,
]


class StreamLoaderExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


def _register_routes() -> None:
    """Add the HTTP routes when a ComfyUI server is loading us (not in-process tests)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        from .routes import register

        register(instance)


async def comfy_entrypoint() -> ComfyExtension:
    return StreamLoaderExtension()
