"""stream_layers in-process on the simulated device (CPU): exact against core, within the budget."""
import pytest
import torch

from comfy_helpers import (CKPT, GIB, TOGGLES, budget_gb, conditioning, engine_of, load_checkpoint,
                          out_of_memory_once, sample)

pytestmark = pytest.mark.comfy

UNET = "tiny_sd3_mmdit.safetensors"


def streamed_checkpoint(manager, fraction: float):
    load_checkpoint()  # builds the engine; the budget depends on its block sizes
    return load_checkpoint(stream_layers=True, max_vram_gb=budget_gb(engine_of(manager), fraction)).args


@pytest.mark.parametrize("fraction", [0.35, 0.6, 0.8])
def test_streamed_checkpoint_equals_core_within_the_budget(comfy, manager, reference, fraction, comfy_device):
    from comfyui_streamloader.nodes.sampling import StreamLoaderKSampler

    pos, neg, latent, expected = reference
    model = streamed_checkpoint(manager, fraction)[0]
    assert torch.equal(sample(comfy, model, pos, neg, latent), expected), "core KSampler, streamed MODEL"
    out = StreamLoaderKSampler.execute(model, 7, 3, 6.0, "euler", "normal", pos, neg, latent)
    assert torch.equal(out.args[0]["samples"], expected)
    figures = engine_of(manager).figures
    assert figures.streamed_units > 0 and figures.streamed_bytes > 0 and figures.steps >= 3
    assert figures.peak_device_bytes <= figures.budget_bytes
    kind = "cuda" if comfy_device == "cuda" else "simulated"
    assert any(line.startswith(f"streamed ({kind} device)") for line in out.ui["text"])
    stats = manager.stats()
    stream = stats["models"][0]["stream"]
    assert stream["peak_device_bytes"] <= stream["budget_bytes"] == figures.budget_bytes
    assert 0 < stats["pinned_bytes"] <= stats["pinned_cap_bytes"], "streamed slabs are pinned, under the cap"


def test_streamed_copies_come_from_page_locked_slabs_in_every_run(comfy, manager, reference):
    """A warm run, and a run after ComfyUI unloaded the model, copy from the slabs page-locked at the
    first: a copy from pageable memory blocks the host and overlaps nothing (on an H200 the warm
    streamed SDXL rows ran slower than the cold ones)."""
    import comfy.model_management as mm

    pos, neg, latent, expected = reference
    model = streamed_checkpoint(manager, 0.35)[0]
    for run in ("first", "warm", "after unload_all_models"):
        if run == "after unload_all_models":
            mm.unload_all_models()
        assert torch.equal(sample(comfy, model, pos, neg, latent), expected), run
        stream = manager.stats()["models"][0]["stream"]
        assert stream["streamed_bytes"] > 0, run
        assert stream["pageable_bytes"] == 0, f"{run}: {stream['pageable_bytes']} bytes copied from pageable memory"


@pytest.mark.parametrize("share", [0.5, 0.8])
def test_streamed_mmdit_equals_core(comfy, manager, share):
    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel

    def load(**toggles):
        return StreamLoaderDiffusionModel.execute(UNET, weight_dtype="default", **{**TOGGLES, **toggles}).args[0]

    load()
    gb = budget_gb(engine_of(manager), share)
    ours = load(stream_layers=True, max_vram_gb=gb)
    core = comfy.UNETLoader().load_unet(UNET, "default")[0]
    pos, neg, latent = conditioning("sd3")
    assert torch.equal(sample(comfy, ours, pos, neg, latent), sample(comfy, core, pos, neg, latent))
    figures = engine_of(manager).figures
    assert figures.streamed_units > 0 and figures.peak_device_bytes <= gb * GIB


def test_mmdit_streamed_in_sub_block_chunks_equals_core(comfy, manager, monkeypatch):
    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel

    monkeypatch.setenv("STREAMLOADER_CHUNK_MB", "2")  # the tiny joint blocks hold 9 MiB each

    def load(**toggles):
        return StreamLoaderDiffusionModel.execute(UNET, weight_dtype="default", **{**TOGGLES, **toggles}).args[0]

    load()
    engine = engine_of(manager)
    assert len(engine.units) > 4 and engine.units[0].name == "joint_blocks.0[0]"
    ours = load(stream_layers=True, max_vram_gb=budget_gb(engine, 0.3))
    core = comfy.UNETLoader().load_unet(UNET, "default")[0]
    pos, neg, latent = conditioning("sd3")
    assert torch.equal(sample(comfy, ours, pos, neg, latent), sample(comfy, core, pos, neg, latent))
    figures = engine.figures
    assert figures.streamed_bytes > 0 and figures.peak_device_bytes <= figures.budget_bytes
    order = engine.snapshot().order  # a joint block registers its context layers first, calls them interleaved
    assert order and len(set(order)) == len(order), "chunks regrouped in call order: each entered once a step"


def test_lora_on_a_streamed_model_equals_core_and_is_patched_once(comfy, manager, reference, monkeypatch):
    import comfy.lora as comfy_lora

    pos, neg, latent, _ = reference
    model, clip, _ = streamed_checkpoint(manager, 0.6)
    core_model, core_clip = comfy.CheckpointLoaderSimple().load_checkpoint(CKPT)[:2]
    lora = "tiny_sd15_lora.safetensors"
    ours = comfy.LoraLoader().load_lora(model, clip, lora, 0.8, 0.8)[0]
    theirs = comfy.LoraLoader().load_lora(core_model, core_clip, lora, 0.8, 0.8)[0]
    expected = sample(comfy, theirs, pos, neg, latent)
    calls = []
    original = comfy_lora.calculate_weight
    monkeypatch.setattr(comfy_lora, "calculate_weight", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    assert torch.equal(sample(comfy, ours, pos, neg, latent), expected)
    assert torch.equal(sample(comfy, ours, pos, neg, latent), expected)
    unet_patches = [k for k in ours.patches if k.startswith("diffusion_model.")]
    assert unet_patches and sorted(calls) == sorted(ours.patches), "each patched weight computed once, not per step"
    assert engine_of(manager).figures.streamed_units > 0


def test_each_streamed_step_renews_the_snapshot_without_walking_every_model(comfy, manager, reference, monkeypatch):
    """The stats snapshot follows every step, but a whole one (a walk over every parameter of every
    held model) is built only at loads and re-plans, not inside the sampling loop."""
    pos, neg, latent, _ = reference
    model = streamed_checkpoint(manager, 0.6)[0]
    sample(comfy, model, pos, neg, latent)  # the first run profiles a step and may re-plan
    walks, whole = [], type(manager).stats
    monkeypatch.setattr(type(manager), "stats", lambda self: walks.append(1) or whole(self))
    sample(comfy, model, pos, neg, latent)
    figures = engine_of(manager).figures
    (stream,) = [m["stream"] for m in manager.snapshot()["models"] if m["stream"]]
    assert stream["steps"] == figures.steps >= 3 and stream["streamed_bytes"] == figures.streamed_bytes
    assert len(walks) < figures.steps


def test_budget_below_the_minimum_fails_before_sampling(comfy, manager, reference):
    from comfyui_streamloader.loader import BudgetTooSmallError

    pos, neg, latent, _ = reference
    model = load_checkpoint(stream_layers=True, max_vram_gb=0.001).args[0]
    with pytest.raises(BudgetTooSmallError, match=r"minimum of \d+\.\d+ GiB"):
        sample(comfy, model, pos, neg, latent)
    assert engine_of(manager).attached is None


def test_the_budget_is_reclamped_to_free_device_memory_at_every_run(comfy, manager, reference, comfy_device):
    """The budget is min(max_vram_gb, free + what the model holds), measured at each run."""
    if comfy_device == "cuda":
        pytest.skip("the simulated device's capacity stands in for free memory; no CUDA variant yet")
    from comfyui_streamloader.loader import device_for

    pos, neg, latent, expected = reference
    model = streamed_checkpoint(manager, 0.8)[0]
    engine, device = engine_of(manager), device_for(torch.device("cpu"))
    cap = round(budget_gb(engine, 0.8) * GIB)
    device.capacity_bytes = device.held_bytes + round(budget_gb(engine, 0.5) * GIB)  # less free than the cap
    try:
        assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
        squeezed = engine.figures.budget_bytes
        assert squeezed < cap and engine.held_bytes <= squeezed
        device.capacity_bytes = None  # memory freed elsewhere: the next run may use the whole cap
        assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
        assert engine.figures.budget_bytes == cap and engine.held_bytes > squeezed
    finally:
        device.capacity_bytes = None


def test_toggling_stream_layers_on_a_held_model(comfy, manager, reference):
    pos, neg, latent, expected = reference
    streamed = streamed_checkpoint(manager, 0.6)[0]
    assert torch.equal(sample(comfy, streamed, pos, neg, latent), expected)
    plain = load_checkpoint().args[0]
    assert torch.equal(sample(comfy, plain, pos, neg, latent), expected)
    assert engine_of(manager).attached is None, "stream_layers off: the engine lets go"
    assert torch.equal(sample(comfy, streamed, pos, neg, latent), expected)
    assert engine_of(manager).attached is not None


def test_interrupt_mid_step_then_the_next_run_is_exact(comfy, manager, reference):
    import comfy.model_management as mm

    pos, neg, latent, expected = reference
    model = streamed_checkpoint(manager, 0.6)[0]
    engine = engine_of(manager)
    layer = engine.units[len(engine.units) // 2].weight_modules()[-1]  # a layer ComfyUI calls
    handle = layer.register_forward_pre_hook(lambda m, a: mm.interrupt_current_processing(True))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(comfy, model, pos, neg, latent)
    finally:
        handle.remove()
    snapshot = engine.snapshot()
    assert snapshot.attached and not snapshot.entered and not snapshot.held
    assert engine.held_bytes <= engine.figures.budget_bytes
    assert not mm.processing_interrupted(), "the interrupt was consumed by the sampling thread only"
    assert torch.equal(sample(comfy, model, pos, neg, latent), expected)


def test_out_of_memory_in_a_streamed_step_retries_once_smaller(comfy, manager, reference):
    pos, neg, latent, expected = reference
    model = streamed_checkpoint(manager, 0.8)[0]
    engine = engine_of(manager)
    sample(comfy, model, pos, neg, latent)
    held = engine.held_bytes
    with out_of_memory_once(engine) as failures:
        assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
    assert failures and engine.held_bytes < held
    assert any("retried once" in note for note in engine.figures.notes)


def test_fp8_weights_stream_as_stored_and_equal_core(comfy, manager):
    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel

    def load(**toggles):
        return StreamLoaderDiffusionModel.execute(UNET, weight_dtype="fp8_e4m3fn", **{**TOGGLES, **toggles}).args[0]

    load()
    engine = engine_of(manager)
    assert {s.dtype for u in engine.units for s in u.specs if s.name == "weight" and len(s.shape) == 2} \
        == {torch.float8_e4m3fn}, "block weights are held and streamed as fp8"
    ours = load(stream_layers=True, max_vram_gb=budget_gb(engine, 0.6))
    core = comfy.UNETLoader().load_unet(UNET, "fp8_e4m3fn")[0]
    pos, neg, latent = conditioning("sd3")
    assert torch.equal(sample(comfy, ours, pos, neg, latent), sample(comfy, core, pos, neg, latent))
    assert engine.figures.streamed_bytes > 0


def test_a_streamed_model_survives_clone_and_detach_without_unpatch(comfy, manager, reference):
    pos, neg, latent, expected = reference
    model = streamed_checkpoint(manager, 0.6)[0]
    assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
    engine = engine_of(manager)
    model.detach(unpatch_all=False)  # what ComfyUI does to a loaded model when a clone of it loads
    assert engine.attached is not None and model.loaded_size() == engine.held_bytes
    clone = model.clone()
    assert torch.equal(sample(comfy, clone, pos, neg, latent), expected)
    assert engine.figures.streamed_bytes > 0 and engine.figures.peak_device_bytes <= engine.figures.budget_bytes
    assert clone.model_size() > clone.loaded_size() > 0, "honest sizes: part of the model is on the device"


def test_unload_outside_inference_mode_then_a_plain_run(comfy, manager, reference):
    """POST /free unloads in the prompt worker, outside inference mode; the next run must still work."""
    import comfy.model_management as mm

    pos, neg, latent, expected = reference
    model, clip, _ = streamed_checkpoint(manager, 0.6)
    patched = comfy.LoraLoader().load_lora(model, clip, "tiny_sd15_lora.safetensors", 0.8, 0.8)[0]
    sample(comfy, patched, pos, neg, latent)
    with torch.inference_mode(False):
        mm.unload_all_models()
    assert torch.equal(sample(comfy, load_checkpoint().args[0], pos, neg, latent), expected)
    assert torch.equal(sample(comfy, streamed_checkpoint(manager, 0.6)[0], pos, neg, latent), expected)
