"""A model file replaced or modified on disk between runs is read again, never served stale.

The same prompt is queued before and after the change, without emptying ComfyUI's caches
in between; the output after the change must equal core UNETLoader's on the new file.
"""
import os
import shutil

import pytest
from server_helpers import (
    disk_read,
    image_digest,
    negate_tensor_in_place,
    read_raw_header,
    rerun,
    reset,
    sd15_prompt,
    stats,
    with_split_loaders,
)

pytestmark = pytest.mark.server

UNET = "changing_unet.safetensors"
SOURCE_UNET = "tiny_sd15_unet.safetensors"
VAE = "tiny_taesd.safetensors"
TENSOR = "out.2.weight"  # the UNet's last conv: negating it changes every output pixel


@pytest.fixture
def unet_path(models_dir, scratch_models, scratch_server) -> str:
    """A fresh real copy of the tiny UNet in the scratch models under a name the test changes;
    the pack holds nothing."""
    path = os.path.join(scratch_models, "diffusion_models", UNET)
    shutil.copyfile(os.path.join(models_dir, "diffusion_models", SOURCE_UNET), path + ".tmp")
    os.replace(path + ".tmp", path)
    reset(scratch_server)
    yield path
    os.remove(path)


def pack_prompt() -> dict:
    return with_split_loaders(sd15_prompt(), UNET, VAE)


def core_prompt() -> dict:
    prompt = pack_prompt()
    prompt["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}}
    return prompt


def replace_with_other_weights(path: str) -> None:
    """A new file (new inode) renamed over the old one, as a download or an export would."""
    shutil.copyfile(path, path + ".new")
    negate_tensor_in_place(path + ".new", TENSOR)
    os.replace(path + ".new", path)


def modify_in_place(path: str) -> None:
    negate_tensor_in_place(path, TENSOR)


def touch(path: str) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def tensor_bytes(path: str) -> int:
    _, data_start = read_raw_header(path)
    return os.path.getsize(path) - data_start


@pytest.mark.parametrize("change, weights_change", [(replace_with_other_weights, True), (modify_in_place, True),
                                                    (touch, False)], ids=["replaced", "modified", "touched"])
def test_a_changed_file_is_read_again_and_never_served_stale(scratch_server, unet_path, change, weights_change):
    before = image_digest(scratch_server, scratch_server.run(pack_prompt()))
    reloads = stats(scratch_server)["reloads"]

    change(unet_path)
    read, record = disk_read(scratch_server, pack_prompt())
    after = image_digest(scratch_server, record)

    now = stats(scratch_server)
    assert now["reloads"] == reloads + 1, "the re-read is not counted in stats `reloads`"
    assert read == tensor_bytes(unet_path), "the changed file was not read again in full"
    held = [m for m in now["models"] if m["path"] == os.path.realpath(unet_path)]
    assert len(held) == 1, f"the old version is still held: {now['models']}"
    assert after == image_digest(scratch_server, rerun(scratch_server, core_prompt())), "stale weights were served"
    assert (after != before) == weights_change
