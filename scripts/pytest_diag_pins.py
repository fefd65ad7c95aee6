"""A pytest plugin for `gpu_check.py --stages diag`: with STREAMLOADER_DIAG_DISABLE_PINNED_MEMORY=1
the in-process ComfyUI (COMFYUI_PATH) runs as `main.py --disable-pinned-memory` would: the flag is
set before tests/comfy's fixture imports comfy.model_management, which reads it once. Load with
`-p pytest_diag_pins` (scripts/ on PYTHONPATH)."""
import os
import sys

ENV = "STREAMLOADER_DIAG_DISABLE_PINNED_MEMORY"


def pytest_configure(config):
    if os.environ.get(ENV) != "1":
        return
    # On sys.path only for this import: with ComfyUI importable, collecting the repository's own
    # __init__.py would import the pack (and CUDA) before tests/comfy's fixture sets `args.cpu`.
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    try:
        from comfy.cli_args import args
    finally:
        sys.path.remove(os.environ["COMFYUI_PATH"])
    args.disable_pinned_memory = True
