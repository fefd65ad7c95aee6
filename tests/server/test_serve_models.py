"""`make serve MODELS=DIR`: DIR's models are served besides the demo models, not instead of them."""
import os

import pytest

pytestmark = pytest.mark.server


def test_more_models_dirs_add_to_the_models(start_server, comfy_path, models_dir, tmp_path):
    extra = tmp_path / "my-models"
    (extra / "checkpoints").mkdir(parents=True)
    os.symlink(os.path.join(models_dir, "checkpoints", "tiny_sd15.safetensors"),
               extra / "checkpoints" / "my_sd15.safetensors")
    with start_server(comfy_path, models_dir, more_models_dirs=(str(extra),)) as server:
        info = server.get("/object_info/StreamLoaderCheckpoint")["StreamLoaderCheckpoint"]
    listed = info["input"]["required"]["ckpt_name"]
    names = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
    assert {"tiny_sd15.safetensors", "my_sd15.safetensors"} <= set(names)
