"""Shared fixtures: where ComfyUI and the tiny models are (set by `make test`)."""
import os
import re
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
# The thread contract's check (loader/threads.py): on for in-process tests and the servers they start.
os.environ["STREAMLOADER_CHECK_THREADS"] = "1"


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run the tests with `make test`, which bootstraps it")
    return value


@pytest.fixture(scope="session")
def comfy_path() -> str:
    return _required_env("COMFYUI_PATH")


@pytest.fixture(scope="session")
def models_dir() -> str:
    return _required_env("STREAMLOADER_MODELS")


@pytest.fixture(scope="session")
def comfyui_version(comfy_path) -> tuple[int, ...]:
    """The version of the ComfyUI under test (its comfyui_version.py), e.g. (0, 3, 75), for the
    test-side differences between versions."""
    with open(os.path.join(comfy_path, "comfyui_version.py")) as f:
        match = re.search(r'__version__\s*=\s*"([\d.]+)"', f.read())
    if match is None:
        pytest.fail(f"{comfy_path}/comfyui_version.py has no __version__; point COMFYUI_PATH at a ComfyUI release")
    return tuple(int(part) for part in match.group(1).split("."))


DEVICE_ENV = "STREAMLOADER_TEST_DEVICE"


def _comfy_device() -> str:
    chosen = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    if chosen not in ("cuda", "cpu"):
        raise pytest.UsageError(f"{DEVICE_ENV}={chosen!r}: set it to `cuda` or `cpu`, or unset it")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{DEVICE_ENV}=cuda, but torch sees no CUDA device; set it to `cpu` or unset it")
    return chosen


@pytest.fixture(scope="session")
def comfy_device() -> str:
    """The device ComfyUI runs on in tests/comfy and tests/server: `cuda` or `cpu`, from
    STREAMLOADER_TEST_DEVICE, by default cuda where torch sees a GPU."""
    return _comfy_device()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only when the device under test is CUDA."""
    if _comfy_device() == "cuda":
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: a GPU, with {DEVICE_ENV} unset or `cuda`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
