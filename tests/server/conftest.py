import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # server_helpers

from comfy_server import ComfyServer
from server_helpers import linked_models_dir


@pytest.fixture(scope="session")
def start_server(comfy_device):
    """``ComfyServer(comfy_path, models_dir, ...)`` on the device under test (``--cpu`` or not)."""
    return functools.partial(ComfyServer, cpu=comfy_device == "cpu")


@pytest.fixture(scope="session")
def server(start_server, comfy_path, models_dir):
    """One real ComfyUI server with the pack, on a free loopback port, for the whole session."""
    with start_server(comfy_path, models_dir) as s:
        yield s


@pytest.fixture(scope="session")
def scratch_models(models_dir, tmp_path_factory) -> str:
    """A models folder that tests add bad or changing files to; the tiny models are linked in."""
    return linked_models_dir(str(tmp_path_factory.mktemp("scratch-models")), models_dir)


@pytest.fixture(scope="session")
def scratch_server(start_server, comfy_path, scratch_models):
    """A second server, on `scratch_models`, so that the shared models folder is never changed."""
    with start_server(comfy_path, scratch_models) as s:
        yield s
