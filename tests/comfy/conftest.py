"""In-process ComfyUI (on STREAMLOADER_TEST_DEVICE: cuda, or cpu) with this pack imported as a custom node package."""
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # comfy_helpers
PACKAGE = "comfyui_streamloader"


@pytest.fixture(scope="session")
def comfy(comfy_path, models_dir, comfy_device, record_testsuite_property):
    """Import ComfyUI on the device under test with the tiny models registered; returns its `nodes` module."""
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = comfy_device == "cpu"
    dynamic = _dynamic_vram_requested()
    import folder_paths
    import nodes

    record_testsuite_property("dynamic_vram", dynamic and _start_dynamic_vram())

    assert os.path.dirname(nodes.__file__) == comfy_path, "ComfyUI's nodes.py must win over this repo's nodes/"
    for folder in ("checkpoints", "diffusion_models", "vae", "loras"):
        folder_paths.add_model_folder_path(folder, os.path.join(models_dir, folder))
    return nodes


def _dynamic_vram_requested() -> bool:
    """main.py's first step on upstream ComfyUI (0.15.0 on): comfy-aimdo is initialised before
    anything touches CUDA, unless DynamicVRAM is off (``--cpu``, ``--disable-dynamic-vram`` ...).
    The in-process tests do the same, so that on a GPU they run what a user's server runs."""
    from comfy import cli_args

    if not getattr(cli_args, "enables_dynamic_vram", lambda: False)():
        return False
    import comfy_aimdo.control

    args = cli_args.args
    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
    comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    return True


def _start_dynamic_vram() -> bool:
    """main.py's second step: aimdo takes the devices, and core's loaders hand out dynamic patchers.
    False where aimdo refuses (main.py then falls back to the non-dynamic patcher, as here)."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfy_aimdo.control
    from comfy import cli_args

    headroom = int(cli_args.args.vram_headroom * 1024**3)
    devices = comfy.model_management.get_all_torch_devices()
    if not comfy_aimdo.control.init_devices((d.index, headroom) for d in devices):
        return False
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return True


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


@pytest.fixture(scope="module")
def reference(comfy):
    """Core's checkpoint loader and KSampler: the result every streamed run must equal."""
    from comfy_helpers import CKPT, encode, sample

    core_model, core_clip = comfy.CheckpointLoaderSimple().load_checkpoint(CKPT)[:2]
    pos, neg = encode(comfy, core_clip)
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    return pos, neg, latent, sample(comfy, core_model, pos, neg, latent)
