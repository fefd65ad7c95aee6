"""A soak on the real server: 32 runs alternating two models, a LoRA and `stream_layers`.

Run i uses the checkpoint's UNet or the separate UNet file (i % 2), core LoraLoader on or off
((i // 2) % 2), `stream_layers` on or off ((i // 4) % 2) and one of two seeds ((i // 8) % 2), so
every setting repeats four times. Once both models were read, no run reads the disk; equal
settings give equal pixels; the server's RSS and the pack's held bytes do not grow with runs.
"""
import pytest
from server_helpers import (
    SAMPLER_NODE,
    disk_read,
    free,
    image_digest,
    reset,
    rss_bytes,
    sd15_prompt,
    stats,
    with_lora,
    with_split_loaders,
)

pytestmark = pytest.mark.server

RUNS = 32
RSS_SLACK = 64 * 2**20


def settings(i: int) -> tuple[bool, bool, bool, int]:
    """(separate UNet file, LoRA, stream_layers, seed) of run ``i``."""
    return bool(i % 2), bool((i // 2) % 2), bool((i // 4) % 2), 42 + (i // 8) % 2


def soak_prompt(split: bool, lora: bool, stream: bool, seed: int) -> dict:
    # 0.07 GiB: the UNet's blocks stream through a ring of two slots (see test_streaming_server.py)
    prompt = sd15_prompt(stream_layers=stream, max_vram_gb=0.07 if stream else 0.0)
    prompt["4"]["inputs"].update(width=32, height=32)
    prompt[SAMPLER_NODE]["inputs"].update(steps=2, seed=seed)
    if split:
        prompt = with_split_loaders(prompt, "tiny_sd15_unet.safetensors", "tiny_taesd.safetensors")
    return with_lora(prompt) if lora else prompt


def test_soak_alternating_models_lora_and_stream_layers(server):
    reset(server)
    digests: dict[tuple, set[str]] = {}
    reads, rss, held, streamed = [], [], [], []
    for i in range(RUNS):
        if i % 5 == 4:
            free(server)  # now and then ComfyUI unloads everything and empties its caches
        try:
            read, record = disk_read(server, soak_prompt(*settings(i)))
        except RuntimeError as e:
            pytest.fail(f"run {i} of {RUNS} (separate UNet, LoRA, stream_layers, seed = {settings(i)}) failed: {e}")
        digests.setdefault(settings(i), set()).add(image_digest(server, record))
        reads.append(read)
        rss.append(rss_bytes(server.process.pid))
        held.append(stats(server)["held_host_bytes"])
        if settings(i)[2]:
            streamed.append(streamed_units(server, settings(i)[0]) > 0)

    assert reads[0] > 0 and reads[1] > 0, "the first run of each model reads it"
    assert reads[2:] == [0] * (RUNS - 2), f"disk bytes read per run after both models were loaded: {reads}"
    assert all(len(d) == 1 for d in digests.values()), f"equal settings gave different pixels: {digests}"
    assert digests[(False, True, False, 42)] != digests[(False, False, False, 42)], "the LoRA changed nothing"
    assert digests[(False, True, True, 42)] == digests[(False, True, False, 42)], "streaming changed the pixels"
    assert streamed and all(streamed), "every stream_layers run streamed blocks"
    early = slice(5, 16)  # runs 5-15: every setting has run, the second seed has begun
    assert max(held[-10:]) <= max(held[early]), f"held_host_bytes grew: {held}"
    assert max(rss[-10:]) <= max(rss[early]) + RSS_SLACK, f"RSS grew (MiB): {[r >> 20 for r in rss]}"


def streamed_units(server, split: bool) -> int:
    """Units the run's diffusion model streamed (its figures are those of its last run)."""
    name = "tiny_sd15_unet.safetensors" if split else "tiny_sd15.safetensors"
    (model,) = [m for m in stats(server)["models"] if m["path"].endswith(name)]
    return model["stream"]["streamed_units"]
