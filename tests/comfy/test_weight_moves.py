"""ComfyUI's moves of the pack's weights: outside inference mode (``POST /free``), and after a
release while ComfyUI still runs the model.

On the CPU, ``module.to("cpu")`` returns the same tensors, so nothing moves; a GPU makes new
tensors at every move. ``_moving`` makes the CPU do what the GPU does: every tensor copied anew,
in the caller's mode, set as the parameter's data as ``Module.to`` does."""
import pytest
import torch

from comfy_helpers import encode, load_checkpoint

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

