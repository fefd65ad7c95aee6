"""Shared fixtures: where ComfyUI and the tiny models are (set by `make test`)."""
import os
import sys

import pytest

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
