"""ComfyUI-StreamLoader's engine: params store, ModelManager, budget, streaming. Imports no ComfyUI."""
from .budget import resolve_budget
from .config import StreamConfig
from .device import Device, device_for
from .manager import ModelEntry, ModelManager, get_manager
from .options import GIB, LoadOptions
from .params import LazyTensor, ParamStore
from .planner import BudgetTooSmallError, Plan, plan_residency
from .profile import shapes_of
from .safetensors_file import ModelFileError, SafetensorsFile, read_header
from .streaming import StreamEngine, StreamFigures

__all__ = [
    "GIB", "BudgetTooSmallError", "Device", "LazyTensor", "LoadOptions", "ModelEntry", "ModelFileError",
    "ModelManager", "ParamStore", "Plan", "SafetensorsFile", "StreamConfig", "StreamEngine", "StreamFigures", "device_for",
    "get_manager", "plan_residency", "read_header", "resolve_budget", "shapes_of",
]
