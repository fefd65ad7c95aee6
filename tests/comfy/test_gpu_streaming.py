"""stream_layers on a real CUDA device: a real out-of-memory error, page-locked slabs, the device
memory a streamed sampling really takes, and an interrupt with copies queued.

Marked `gpu`: skipped unless the device under test is CUDA (tests/conftest.py). Written through
public behaviour (the nodes, core's sampler, the manager's stats, the model's own parameters), so
that the engine can be restructured under them.
"""
import pytest
import torch

from comfy_helpers import TOGGLES, conditioning, sample

pytestmark = [pytest.mark.gpu, pytest.mark.comfy]

GIB, MIB = 1024**3, 1024**2
UNET = "tiny_sd15_unet.safetensors"
# torch's caching allocator rounds every allocation up to a multiple of 512 bytes, so what it
# reports exceeds the engine's exact books by up to 511 bytes per tensor (this model: < 200 tensors).
ALLOCATOR_ROUNDING = 1 * MIB


def load(**toggles):
    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel

    return StreamLoaderDiffusionModel.execute(UNET, weight_dtype="default", **{**TOGGLES, **toggles}).args[0]


def stream_stats(manager) -> dict:
    (model,) = [m for m in manager.stats()["models"] if m.get("stream")]
    return model["stream"]


def streamed(manager, share: float):
    """The tiny SD1.5 UNet streamed, with ``share`` of its blocks' bytes (plus the ring) in the budget."""
    load()
    (engine,) = [e.engine for e in manager.entries() if e.engine is not None]
    budget = engine.fixed_bytes + share * sum(engine.unit_bytes) + 2 * max(engine.unit_bytes)
    return load(stream_layers=True, max_vram_gb=budget / GIB)


@pytest.fixture
def expected(comfy, manager):
    """Core's UNet loader and sampler on the same inputs: what every streamed run must equal."""
    pos, neg, latent = conditioning("sd15")
    return pos, neg, latent, sample(comfy, comfy.UNETLoader().load_unet(UNET, "default")[0], pos, neg, latent)


def diffusion_model(model):
    return model.model.diffusion_model


def fill_device() -> list[torch.Tensor]:
    """Take every byte the device has left, down to 512-byte blocks (cached ones included)."""
    torch.cuda.empty_cache()
    filler, size = [], GIB
    while size >= 512:
        try:
            filler.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            size //= 8
    return filler


def test_a_real_out_of_memory_error_in_a_streamed_step_is_retried_smaller_then_exact(comfy, manager, expected):
    pos, neg, latent, reference = expected
    model = streamed(manager, 0.8)
    assert torch.equal(sample(comfy, model, pos, neg, latent), reference)
    held = stream_stats(manager)["device_bytes"]
    filler = []

    def fill_once(module, args):  # mid-step, after the placement: the next allocation fails for real
        if not filler:
            filler.extend(fill_device())

    # ComfyUI runs the middle block's layers one by one, never the block itself: hook its first layer.
    handle = diffusion_model(model).middle_block[0].register_forward_pre_hook(fill_once)
    try:
        result = comfy.common_ksampler(model, 7, 3, 6.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    finally:
        handle.remove()
        filler.clear()
    figures = stream_stats(manager)
    assert any("retried once" in note for note in figures["notes"]), figures["notes"]
    assert figures["device_bytes"] < held
    assert torch.equal(result, reference)


def test_streamed_slabs_are_page_locked_and_unregistered_on_release(comfy, manager, expected):
    import comfy.model_management as mm

    pos, neg, latent, reference = expected
    model = streamed(manager, 0.3)
    assert torch.equal(sample(comfy, model, pos, neg, latent), reference)
    assert stream_stats(manager)["streamed_units"] > 0
    # Outside a step, streamed blocks' parameters are views of their host slabs.
    on_host = [p.data for p in diffusion_model(model).parameters() if p.device.type == "cpu"]
    assert on_host, "no streamed parameter on the host"
    # is_pinned asks CUDA (cudaPointerGetAttributes) whether the host range is page-locked.
    assert all(t.is_pinned() for t in on_host)
    assert 0 < manager.stats()["pinned_bytes"]
    mm.unload_all_models()
    manager.release_all()  # the slabs stay alive here through `on_host`
    assert manager.stats()["pinned_bytes"] == 0
    assert not any(t.is_pinned() for t in on_host), "a released slab is still registered with CUDA"


def peak_of_sampling(comfy, model, pos, neg, latent) -> tuple[int, torch.Tensor]:
    """Device bytes a sampling took above what was allocated before it, and its result."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = comfy.common_ksampler(model, 7, 3, 6.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, result


def test_a_streamed_sampling_takes_at_most_the_budget_plus_a_resident_runs_activations(comfy, manager, expected):
    import comfy.model_management as mm

    pos, neg, latent, reference = expected
    resident = load()
    sample(comfy, resident, pos, neg, latent)  # loaded: what the next sampling takes is activations
    activations, result = peak_of_sampling(comfy, resident, pos, neg, latent)
    assert torch.equal(result, reference)
    model = streamed(manager, 0.3)
    sample(comfy, model, pos, neg, latent)
    mm.unload_all_models()  # measured from nothing on the device: the placement counts too
    mm.soft_empty_cache()
    peak, _ = peak_of_sampling(comfy, model, pos, neg, latent)  # a first sampling after a move: see settled()
    figures = stream_stats(manager)
    assert figures["streamed_units"] > 0
    bound = figures["budget_bytes"] + activations + ALLOCATOR_ROUNDING
    assert peak <= bound, f"peak {peak} B, budget {figures['budget_bytes']} B, activations {activations} B"


def test_an_interrupt_leaves_no_copy_in_flight_and_the_next_run_is_exact(comfy, manager, expected):
    import comfy.model_management as mm

    from comfyui_streamloader.loader import device_for

    pos, neg, latent, reference = expected
    model = streamed(manager, 0.3)
    assert torch.equal(sample(comfy, model, pos, neg, latent), reference)
    unet = diffusion_model(model)
    # Compute falls a second behind from the step's start, so the copies queued after it (they
    # wait for compute to free their slots) are still in flight when the interrupt is raised.
    slow = unet.time_embed.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(2_000_000_000))
    stop = unet.middle_block[0].register_forward_pre_hook(lambda m, a: mm.interrupt_current_processing(True))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.common_ksampler(model, 7, 3, 6.0, "euler", "normal", pos, neg, latent)
    finally:
        slow.remove()
        stop.remove()
    assert device_for(torch.device("cuda")).copy_stream.query(), "a copy is still in flight after the interrupt"
    assert not mm.processing_interrupted()
    assert torch.equal(sample(comfy, model, pos, neg, latent), reference)
