"""A model that does not stream: its steps carry nothing of the streaming engine, and ComfyUI's
book keeps the bytes it placed."""
import pytest
import torch

from comfy_helpers import load_checkpoint, sample

pytestmark = pytest.mark.comfy


def test_a_resident_model_runs_without_the_step_wrapper_and_keeps_its_loaded_size(comfy, manager, reference):
    from comfy.patcher_extension import WrappersMP

    pos, neg, latent, expected = reference
    model = load_checkpoint().args[0]
    # The wrapper publishes the stats, a walk over every parameter, at each step: 14-20 ms on SDXL.
    assert "streamloader_step" not in model.wrappers.get(WrappersMP.APPLY_MODEL, {})
    assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
    # LoadedModel.model_loaded_memory: at 0, ComfyUI loads the model again at every prompt and
    # counts its resident weights as free when it makes room for another model.
    assert model.loaded_size() == model.model_size() > 0
