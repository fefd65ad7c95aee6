"""Shared steps of the in-process tests: the pack's loaders, core's sampler, fixed inputs."""
import contextlib

import torch

CKPT = "tiny_sd15.safetensors"
TOGGLES = {"offload_to_cpu": True, "stream_layers": False, "max_vram_gb": 0.0, "eager_load": False}


def load_checkpoint(**toggles):
    from comfyui_streamloader.nodes.loaders import StreamLoaderCheckpoint

    return StreamLoaderCheckpoint.execute(CKPT, **{**TOGGLES, **toggles})


def settled(device: torch.device, run):
    """``run()``; on a GPU, after one warm-up call. A model moved to the GPU at its first use
    (the pack's lazy path) gives a first result that differs, by up to 0.17 on an H200, from a
    model loaded straight to the GPU (core's loaders where VRAM exceeds RAM); from the second
    use on they are equal (see ../shared/notes/gpu-2026-11-28.md). Like is compared with like."""
    if device.type == "cuda":
        run()
    return run()


def sample(comfy, model, positive, negative, latent, seed=7):
    """Core's KSampler (settled on a GPU)."""
    return settled(model.load_device, lambda: comfy.common_ksampler(
        model, seed, 3, 6.0, "euler", "normal", positive, negative, latent)[0]["samples"])


def encode(comfy, clip):
    """Core's CLIPTextEncode of a prompt and of an empty one (settled on a GPU)."""
    return settled(clip.patcher.load_device, lambda: (comfy.CLIPTextEncode().encode(clip, "a red fox")[0],
                                                      comfy.CLIPTextEncode().encode(clip, "")[0]))


def conditioning(kind: str):
    gen = torch.Generator().manual_seed(3)
    if kind == "sd15":
        cond = [[torch.randn(1, 77, 768, generator=gen), {}]]
        return cond, cond, {"samples": torch.zeros(1, 4, 8, 8)}
    cond = [[torch.randn(1, 16, 4096, generator=gen), {"pooled_output": torch.randn(1, 2048, generator=gen)}]]
    return cond, cond, {"samples": torch.zeros(1, 16, 16, 16)}


GIB = 1024**3


def engine_of(manager):
    """The streaming engine of the one held model that has one."""
    (entry,) = [e for e in manager.entries() if e.engine is not None]
    return entry.engine


def budget_gb(engine, share: float) -> float:
    """A budget for the weights outside the blocks and this share of the blocks' bytes (ring included)."""
    return (engine.fixed_bytes + share * sum(engine.unit_bytes)) / GIB


@contextlib.contextmanager
def out_of_memory_once(engine):
    """The allocator fails once inside the last streamed block, as CUDA does under pressure;
    yields the list of failures raised."""
    failures = []

    def fail_once(module, args):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = engine.units[-1].weight_modules()[-1].register_forward_pre_hook(fail_once)
    try:
        yield failures
    finally:
        handle.remove()
