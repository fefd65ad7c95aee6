"""ComfyUI-StreamLoader's engine: params store, ModelManager, budget. Imports no ComfyUI."""
from .budget import resolve_budget
from .manager import ModelEntry, ModelManager, get_manager
from .options import GIB, LoadOptions
from .params import LazyTensor, ParamStore
from .safetensors_file import ModelFileError, SafetensorsFile, read_header

__all__ = [
    "GIB", "LazyTensor", "LoadOptions", "ModelEntry", "ModelFileError", "ModelManager", "ParamStore",
    "SafetensorsFile", "get_manager", "read_header", "resolve_budget",
]
