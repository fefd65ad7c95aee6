"""Generate the tiny real-architecture models the demo and the tests run on.

Built with ComfyUI's own classes and filled from a seeded generator, so every run writes
the same bytes; each diffusion model is checked against ComfyUI's own detection.
Usage: python scripts/make_models.py MODELS_DIR   (run with ComfyUI importable)
"""
import math
import os
import sys

from comfy.cli_args import args

args.cpu = True

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import comfy.model_detection  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.taesd.taesd  # noqa: E402

SEED = 20261127

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "channel_mult": [1],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1], "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

SD3_MMDIT = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 4, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_max_size": 32, "num_patches": 1024, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 256}},
    "x_block_self_attn_layers": [],
}


def seeded_state_dict(module: torch.nn.Module, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Fill every float tensor from ``gen``: fan-in scaled weights, unit norms, small biases."""
    out = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point() or t.ndim == 0:
            out[name] = t.clone() if not t.is_floating_point() else t.clone().to(dtype)
            continue
        if t.ndim == 1 and name.endswith("weight"):
            value = 1.0 + 0.05 * torch.randn(t.shape, generator=gen)
        elif t.ndim == 1:
            value = 0.02 * torch.randn(t.shape, generator=gen)
        else:
            value = torch.randn(t.shape, generator=gen) / math.sqrt(max(t[0].numel(), 1))
        out[name] = value.to(dtype).contiguous()
    return out


def build_unet(unet_config: dict, expect: str):
    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    assert type(config).__name__ == expect, f"built {type(config).__name__}, expected {expect}"
    return config.get_model({}).diffusion_model


def check_detected(sd: dict, prefix: str, expect: str) -> None:
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    found = type(config).__name__ if config is not None else None
    if found != expect:
        raise SystemExit(f"ComfyUI detects {found}, expected {expect}")


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def save(sd: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file(sd, path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


def sd15_lora(unet: dict, gen: torch.Generator, rank: int = 4) -> dict:
    """A LoRA in the kohya naming core LoraLoader reads, on the UNet's attention projections."""
    lora = {}
    for key, weight in unet.items():
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            lora[f"{name}.lora_down.weight"] = (0.1 * torch.randn(rank, weight.shape[1], generator=gen)).half()
            lora[f"{name}.lora_up.weight"] = (0.1 * torch.randn(weight.shape[0], rank, generator=gen)).half()
            lora[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    return lora


def main(models_dir: str) -> None:
    gen = torch.Generator().manual_seed(SEED)
    unet = seeded_state_dict(build_unet(SD15_UNET, "SD15"), torch.float16, gen)
    check_detected(unet, "", "SD15")
    taesd = seeded_state_dict(comfy.taesd.taesd.TAESD(), torch.float32, gen)
    clip = seeded_state_dict(comfy.sd1_clip.SD1ClipModel(dtype=torch.float16), torch.float16, gen)
    clip = {k.replace("clip_l.transformer.", "cond_stage_model.transformer."): v for k, v in clip.items()}
    checkpoint = {**prefixed(unet, "model.diffusion_model."), **prefixed(taesd, "first_stage_model."), **clip}
    check_detected(checkpoint, "model.diffusion_model.", "SD15")
    save(checkpoint, f"{models_dir}/checkpoints/tiny_sd15.safetensors")
    save(unet, f"{models_dir}/diffusion_models/tiny_sd15_unet.safetensors")
    save(taesd, f"{models_dir}/vae/tiny_taesd.safetensors")
    save(sd15_lora(unet, gen), f"{models_dir}/loras/tiny_sd15_lora.safetensors")
    mmdit = seeded_state_dict(build_unet(SD3_MMDIT, "SD3"), torch.bfloat16, gen)
    check_detected(mmdit, "", "SD3")
    save(mmdit, f"{models_dir}/diffusion_models/tiny_sd3_mmdit.safetensors")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
