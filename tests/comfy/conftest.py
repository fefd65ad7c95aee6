"""In-process ComfyUI (CPU) with this pack imported as a custom node package."""
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # comfy_helpers
PACKAGE = "comfyui_streamloader"


@pytest.fixture(scope="session")
def comfy(comfy_path, models_dir):
    """Import ComfyUI on the CPU with the tiny models registered; returns its `nodes` module."""
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths
    import nodes

    assert os.path.dirname(nodes.__file__) == comfy_path, "ComfyUI's nodes.py must win over this repo's nodes/"
    for folder in ("checkpoints", "diffusion_models", "vae", "loras"):
        folder_paths.add_model_folder_path(folder, os.path.join(models_dir, folder))
    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def manager(pack):
    """The process-wide manager, emptied before each test so that byte counts start cold."""
    from comfyui_streamloader.loader import get_manager

    import comfy.model_management

    comfy.model_management.unload_all_models()
    m = get_manager()
    m.release_all()
    return m


@pytest.fixture(autouse=True)
def _inference():
    """ComfyUI runs nodes under inference mode."""
    with torch.inference_mode():
        yield
