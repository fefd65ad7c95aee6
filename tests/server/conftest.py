import pytest

from comfy_server import ComfyServer


@pytest.fixture(scope="session")
def server(comfy_path, models_dir):
    """One real ComfyUI server with the pack, on a free loopback port, for the whole session."""
    with ComfyServer(comfy_path, models_dir) as s:
        yield s
