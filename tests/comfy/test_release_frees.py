"""A released model's memory is really freed: nothing of the pack keeps its module alive."""
import gc
import weakref

import pytest

from comfy_helpers import TOGGLES, conditioning, sample

pytestmark = pytest.mark.comfy


@pytest.mark.parametrize("toggles", [{}, {"eager_load": True}, {"stream_layers": True, "max_vram_gb": 0.06}],
                         ids=["lazy", "eager", "streamed"])
def test_a_released_model_is_freed(comfy, manager, toggles):
    from comfy.model_management import unload_all_models

    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel

    model = StreamLoaderDiffusionModel.execute("tiny_sd15_unet.safetensors", weight_dtype="default",
                                               **{**TOGGLES, **toggles}).args[0]
    pos, neg, latent = conditioning("sd15")
    sample(comfy, model, pos, neg, latent)
    module = weakref.ref(model.model)
    del model
    unload_all_models()
    manager.release_all()
    gc.collect()
    assert module() is None, [type(r).__name__ for r in gc.get_referrers(module())][:10]
