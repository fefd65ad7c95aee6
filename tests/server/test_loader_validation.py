"""The loaders check file names (and `weight_dtype`) at POST /prompt, as core's loaders do:
ComfyUI answers 400 with node errors, queues nothing and the pack reads nothing."""
import json
import urllib.error

import pytest
from server_helpers import LOADER_NODE, sd15_prompt, stats, with_split_loaders

pytestmark = pytest.mark.server

OUTSIDE = ["../../../../etc/hostname", "/etc/hostname", "checkpoints/../../../etc/hostname"]


def refused(server, prompt: dict) -> dict:
    """POST ``prompt``, which must be refused; returns ComfyUI's node errors."""
    with pytest.raises(urllib.error.HTTPError) as answer:
        server.post("/prompt", {"prompt": prompt})
    assert answer.value.code == 400
    return json.loads(answer.value.read())["node_errors"]


def messages(node_errors: dict, node: str) -> list[str]:
    return [e["details"] for e in node_errors[node]["errors"]]


@pytest.mark.parametrize("name", [*OUTSIDE, "missing.safetensors"])
def test_a_checkpoint_name_not_in_the_list_is_refused_at_post_without_a_byte_read(server, name):
    before, history = stats(server)["disk_bytes_read"], server.get("/history")
    errors = refused(server, sd15_prompt(ckpt_name=name))
    (detail,) = messages(errors, LOADER_NODE)
    assert f"ckpt_name - `ckpt_name` {name!r} is not in the list of checkpoints files" in detail
    assert errors[LOADER_NODE]["errors"][0]["type"] == "custom_validation_failed"
    assert stats(server)["disk_bytes_read"] == before and server.get("/history") == history
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_split_loaders_check_their_names_and_the_weight_dtype(server):
    prompt = with_split_loaders(sd15_prompt(), "/etc/hostname", "../../etc/hostname")
    prompt["10"]["inputs"]["weight_dtype"] = "fp4"
    errors = refused(server, prompt)
    unet, vae = " ".join(messages(errors, "10")), " ".join(messages(errors, "11"))
    assert "`unet_name` '/etc/hostname' is not in the list of diffusion_models files" in unet
    assert "`weight_dtype` 'fp4' is not one of default, fp8_e4m3fn" in unet
    assert "`vae_name` '../../etc/hostname' is not in the list of vae files" in vae


def test_listed_names_pass(server):
    prompt = with_split_loaders(sd15_prompt(), "tiny_sd15_unet.safetensors", "tiny_taesd.safetensors")
    assert server.post("/prompt", {"prompt": prompt})["node_errors"] == {}
