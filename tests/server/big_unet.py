"""Write a full-size SD1.5 UNet (860M parameters, 1.6 GiB in fp16) whose weights are all zero,
as a sparse file: ComfyUI detects it as SD15 and the pack loads it like any other, in seconds.
Usage: python big_unet.py OUT_PATH   (run with ComfyUI importable)."""
import json
import struct
import sys

from comfy.cli_args import args

args.cpu = True

import torch  # noqa: E402

import comfy.model_detection  # noqa: E402

SD15_FULL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
_DTYPES = {torch.float16: ("F16", 2)}


def shapes() -> dict[str, tuple[int, ...]]:
    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_FULL_UNET))
    assert type(config).__name__ == "SD15", type(config).__name__
    with torch.device("meta"):
        unet = config.get_model({}, device="meta").diffusion_model
    return {name: tuple(t.shape) for name, t in unet.state_dict().items()}


def write_zero_unet(path: str) -> int:
    """Returns the file's size in bytes."""
    header, offset = {}, 0
    for name, shape in shapes().items():
        nbytes = 2 * (torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a sparse file: reads return zeros
    return 8 + len(raw) + offset


if __name__ == "__main__":
    print(write_zero_unet(sys.argv[1]))
