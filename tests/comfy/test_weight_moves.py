"""ComfyUI's moves of the pack's weights: outside inference mode (``POST /free``), and after a
release while ComfyUI still runs the model.

On the CPU, ``module.to("cpu")`` returns the same tensors, so nothing moves; a GPU makes new
tensors at every move. ``_moving`` makes the CPU do what the GPU does: every tensor copied anew,
in the caller's mode, set as the parameter's data as ``Module.to`` does."""
import pytest
import torch

from comfy_helpers import budget_gb, encode, engine_of, load_checkpoint, sample

pytestmark = pytest.mark.comfy


def _moving(module: torch.nn.Module):
    def to(*args, **kwargs):
        return module._apply(lambda t: t.clone())

    return to


def test_an_unload_outside_inference_mode_leaves_the_text_encoder_usable(comfy, manager):
    """The soak test's failure on an H200 ("Inference tensors do not track version counter" in
    CLIPTextEncode, the run after ``POST /free``), made on the CPU."""
    import comfy.model_management as mm

    _, clip, _ = load_checkpoint().args
    (before, _) = encode(comfy, clip)
    clip.patcher.model.to = _moving(clip.patcher.model)
    try:
        with torch.inference_mode(False):  # the prompt worker applies /free outside inference mode
            mm.unload_all_models()
    finally:
        del clip.patcher.model.to
    (after, _) = encode(comfy, clip)
    assert torch.equal(before[0][0], after[0][0])


def test_a_model_run_after_its_release_unregisters_its_slabs_when_unloaded(comfy, manager, reference):
    """A release closes the engine (its slabs unregistered), but ComfyUI's cache still holds the
    model and runs it: that run page-locks the slabs again. Its unload must unregister them, or
    they are freed while registered when the model is dropped."""
    import comfy.model_management as mm

    pos, neg, latent, expected = reference
    load_checkpoint()
    engine = engine_of(manager)
    model = load_checkpoint(stream_layers=True, max_vram_gb=budget_gb(engine, 0.6)).args[0]
    sample(comfy, model, pos, neg, latent)
    assert manager.stats()["pinned_bytes"] > 0
    manager.release_all()
    assert manager.stats()["pinned_bytes"] == 0
    assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
    assert manager.stats()["pinned_bytes"] > 0, "the run after the release page-locked the slabs again"
    mm.unload_all_models()
    assert manager.stats()["pinned_bytes"] == 0, "slabs still registered after the unload of a released model"
