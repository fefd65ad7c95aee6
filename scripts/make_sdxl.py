"""Generate an SDXL-sized checkpoint for the end-to-end benchmark (bench/e2e_bench.py).

The real SDXL architecture from ComfyUI's own classes (UNet 2.6 B parameters, CLIP-L, CLIP-G,
the VAE), random weights in fp16, saved in the single-file checkpoint layout ComfyUI's
CheckpointLoaderSimple reads (its own `state_dict_for_saving` names the keys). The modules are
built on the meta device, so no memory holds the unfilled model; each tensor is drawn on the
chosen device (a GPU takes about a second for all of them) and written as it comes, so the host
needs memory for one tensor, not 7 GB. Checked against ComfyUI's own detection.

Usage: python scripts/make_sdxl.py CHECKPOINT_PATH [--device cuda]   (run with ComfyUI importable)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct

import torch

from comfy.cli_args import args

args.cpu = True  # the model is built on the meta device; ComfyUI must not claim a GPU here

import comfy.ldm.models.autoencoder  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.sdxl_clip  # noqa: E402

SEED = 20261128
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def sdxl_shapes() -> dict[str, torch.Tensor]:
    """The checkpoint's keys, as meta tensors (shape and dtype, no data)."""
    with torch.device("meta"):
        config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET))
        assert type(config).__name__ == "SDXL", f"built {type(config).__name__}, expected SDXL"
        model = config.get_model({})
        clip = comfy.sdxl_clip.SDXLClipModel(dtype=torch.float16)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    # What BaseModel.state_dict_for_saving does (its signature differs between 0.3.75 and 0.33.0).
    return {**config.process_unet_state_dict_for_saving(model.diffusion_model.state_dict()),
            **config.process_clip_state_dict_for_saving(clip.state_dict()),
            **config.process_vae_state_dict_for_saving(vae.state_dict())}


def random_value(name: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """fp16 on the host, drawn on the generator's device: fan-in scaled weights, unit norms,
    small biases (the output stays finite through the 70 transformer blocks); zeros for scalars."""
    if like.ndim == 0 or not like.is_floating_point():
        return torch.zeros(like.shape, dtype=torch.float16 if like.is_floating_point() else like.dtype)
    noise = torch.randn(like.shape, generator=gen, device=gen.device)
    if like.ndim == 1:
        noise = 1.0 + 0.05 * noise if name.endswith("weight") else 0.02 * noise
    else:
        noise = noise / math.sqrt(max(like[0].numel(), 1))
    return noise.to(torch.float16).cpu().contiguous()


_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path: str, shapes: dict[str, torch.Tensor], value) -> int:
    """Write a safetensors file tensor by tensor (``value(name, meta)`` gives each one); returns its size."""
    dtypes = {name: torch.float16 if t.is_floating_point() else t.dtype for name, t in shapes.items()}
    header, offset = {}, 0
    for name, t in shapes.items():
        size = t.numel() * dtypes[name].itemsize
        header[name] = {"dtype": _DTYPES[dtypes[name]], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, t in shapes.items():
            f.write(value(name, t).numpy().tobytes())
    os.replace(path + ".part", path)
    return os.path.getsize(path)


def check_detected(path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        unet = {k: f.get_slice(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    shapes = {k: torch.empty(s.get_shape(), device="meta") for k, s in unet.items()}
    config = comfy.model_detection.model_config_from_unet(shapes, "model.diffusion_model.")
    if type(config).__name__ != "SDXL":
        raise SystemExit(f"ComfyUI detects {type(config).__name__} in {path}, expected SDXL")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = p.parse_args()
    gen = torch.Generator(opts.device).manual_seed(SEED)
    shapes = sdxl_shapes()
    size = write_safetensors(opts.path, shapes, lambda name, t: random_value(name, t, gen))
    check_detected(opts.path)
    params = sum(t.numel() for t in shapes.values())
    print(f"wrote {opts.path}: SDXL, {params / 1e9:.2f} B parameters, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
