"""Bad model files on a real server: a clear error at load, and the server keeps serving.

The bad files are copies of the good tiny models, added to the scratch server's models folder.
Each is queued lazily and eagerly; the prompt must fail in the loader node (so in lazy mode
before sampling) with a message that names the file, the fault and the fix; the next good run
must give the reference run's pixels.
"""
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from comfy_server import executed_nodes
from server_helpers import (
    LOADER_NODE,
    SAMPLER_NODE,
    failed_run,
    image_digest,
    read_raw_header,
    rerun,
    rewrite_header,
    sd15_prompt,
    stats,
    with_split_loaders,
)

pytestmark = pytest.mark.server

GOOD = {"checkpoints": "tiny_sd15.safetensors", "diffusion_models": "tiny_sd15_unet.safetensors",
        "vae": "tiny_taesd.safetensors"}
LOADERS = {"checkpoints": (LOADER_NODE, "StreamLoaderCheckpoint"),
           "diffusion_models": ("10", "StreamLoaderDiffusionModel"), "vae": ("11", "StreamLoaderVAE")}
UNET_TENSOR = "input_blocks.1.0.in_layers.2.weight"  # [320, 320, 3, 3] F16 in the tiny SD1.5 UNet
CKPT_UNET_TENSOR = "model.diffusion_model." + UNET_TENSOR


def random_bytes(src: str, dst: str) -> None:
    with open(dst, "wb") as f:
        f.write(random.Random(0).randbytes(1 << 16))


def cut_to(fraction: float) -> Callable[[str, str], None]:
    def make(src: str, dst: str) -> None:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(fin.read(int(os.path.getsize(src) * fraction)))
    return make


def garbled_header(src: str, dst: str) -> None:
    """The real file with the first bytes of its JSON header overwritten."""
    _, data_start = read_raw_header(src)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        head = bytearray(fin.read(data_start))
        head[8:18] = b"#not-json#"
        fout.write(head + fin.read())


def edit_tensor(name: str, **changes) -> Callable[[str, str], None]:
    """The real file with one tensor's header entry changed (data untouched)."""
    def make(src: str, dst: str) -> None:
        rewrite_header(src, dst, lambda header: header[name].update(
            {k: v(header[name][k]) if callable(v) else v for k, v in changes.items()}))
    return make


@dataclass(frozen=True)
class BadFile:
    id: str
    folder: str
    make: Callable[[str, str], None]
    fault: str  # a regex the error message must match
    fix: str  # what the message must tell the user to do

    @property
    def name(self) -> str:
        return f"bad_{self.id}.safetensors"


_REDOWNLOAD = "Re-download or re-export the file"
BAD_FILES = [
    BadFile("random_bytes", "checkpoints", random_bytes,
            r"the header length \(\d+ bytes\) is larger than the file \(65536 bytes\)", _REDOWNLOAD),
    BadFile("cut_in_header", "checkpoints", cut_to(0.0001),
            r"the header length \(\d+ bytes\) is larger than the file .*truncated or not a safetensors file",
            _REDOWNLOAD),
    BadFile("header_not_json", "checkpoints", garbled_header, r"its header is not valid JSON", _REDOWNLOAD),
    BadFile("offsets_beyond_end", "checkpoints",
            edit_tensor(CKPT_UNET_TENSOR, data_offsets=lambda o: [o[0] + 2**30, o[1] + 2**30]),
            rf"tensor `{CKPT_UNET_TENSOR}` ends at byte \d+ of the data section, beyond its end.*corrupt", _REDOWNLOAD),
    BadFile("truncated", "checkpoints", cut_to(0.5),
            r"it is truncated: its header describes \d+ bytes of tensor data but only \d+ follow it",
            "Download or copy the file again"),
    BadFile("wrong_shape", "checkpoints", edit_tensor(CKPT_UNET_TENSOR, shape=[320, 2880]),
            rf"tensor `{UNET_TENSOR}` has shape \[320, 2880\] in the file but the architecture ComfyUI "
            r"detected needs \[320, 320, 3, 3\]", "Re-export or re-download the file"),
    BadFile("wrong_dtype", "checkpoints", edit_tensor(CKPT_UNET_TENSOR, dtype="I16"),
            rf"tensor `{CKPT_UNET_TENSOR}` is stored as torch.int16 but the model's weights are floating point",
            _REDOWNLOAD),
    BadFile("unet_wrong_shape", "diffusion_models", edit_tensor(UNET_TENSOR, shape=[2880, 320]),
            rf"tensor `{UNET_TENSOR}` has shape \[2880, 320\] in the file but the architecture ComfyUI "
            r"detected needs \[320, 320, 3, 3\]", "Re-export or re-download the file"),
    BadFile("vae_truncated", "vae", cut_to(0.7), r"it is truncated", "Download or copy the file again"),
]


def prompt_for(folder: str, name: str, eager: bool) -> dict:
    """The SD1.5 workflow with ``name`` in the loader of ``folder``, the other parts good."""
    prompt = sd15_prompt(eager_load=eager)
    if folder == "checkpoints":
        prompt[LOADER_NODE]["inputs"]["ckpt_name"] = name
        return prompt
    names = {**GOOD, folder: name}
    return with_split_loaders(prompt, names["diffusion_models"], names["vae"])


@pytest.fixture(scope="module")
def bad_models(models_dir, scratch_models) -> str:
    """The scratch models folder with every bad file added (removed afterwards)."""
    paths = [os.path.join(scratch_models, bad.folder, bad.name) for bad in BAD_FILES]
    for bad, path in zip(BAD_FILES, paths):
        bad.make(os.path.join(models_dir, bad.folder, GOOD[bad.folder]), path)
    yield scratch_models
    for path in paths:
        os.remove(path)


@pytest.fixture(scope="module")
def bad_server(scratch_server, bad_models):
    return scratch_server


def good_prompt(folder: str) -> dict:
    return prompt_for(folder, GOOD[folder], eager=False)


@pytest.fixture(scope="module")
def reference_digest(bad_server):
    """The pixels of the good run that replaces a bad file of ``folder``, computed once per workflow."""
    digests = {}

    def digest(folder: str) -> str:
        key = json.dumps(good_prompt(folder), sort_keys=True)
        if key not in digests:
            digests[key] = image_digest(bad_server, rerun(bad_server, good_prompt(folder)))
        return digests[key]
    return digest


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
@pytest.mark.parametrize("bad", BAD_FILES, ids=lambda b: b.id)
def test_a_bad_file_fails_clearly_at_load_and_the_next_run_is_unchanged(bad_server, bad_models, reference_digest,
                                                                        bad, eager):
    reference = reference_digest(bad.folder)
    error = failed_run(bad_server, prompt_for(bad.folder, bad.name, eager))
    assert (error["node_id"], error["node_type"]) == LOADERS[bad.folder], "the fault must be found by the loader"
    assert SAMPLER_NODE not in error["executed"], "the run reached sampling before the fault was found"
    message = error["exception_message"]
    path = os.path.realpath(os.path.join(bad_models, bad.folder, bad.name))
    assert f"`{path}`" in message, f"the message does not name the file: {message}"
    assert re.search(bad.fault, message), f"the message does not name the fault: {message}"
    assert bad.fix in message, f"the message does not say what to do: {message}"
    assert all(m["path"] != path for m in stats(bad_server)["models"]), "a bad file was kept"

    record = rerun(bad_server, good_prompt(bad.folder))
    assert LOADERS[bad.folder][0] in executed_nodes(record)
    assert image_digest(bad_server, record) == reference
