"""ComfyUI-StreamLoader: streamed, warm-cached model loading for ComfyUI.

ComfyUI imports this file; plain pytest of `loader/` imports nothing of ComfyUI.
"""
try:
    import comfy_api  # noqa: F401
except ImportError:  # imported outside ComfyUI (unit tests of loader/)
    pass
else:
    from .nodes import _register_routes, comfy_entrypoint

    _register_routes()
    WEB_DIRECTORY = "./web"  # the graph editor's extension: figures on the nodes, the StreamLoader tab
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
