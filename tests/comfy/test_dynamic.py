"""The pack under upstream's DynamicVRAM, forced on the CPU, and saving a partially loaded model.

With ``--cpu`` upstream never builds a dynamic patcher (``ModelPatcherDynamic`` maps CPU
load devices to the plain one), so these tests make core's patcher class report
``is_dynamic() == True``: core's loaders then load state dicts with ``assign=True``, the
path that broke the pack's VAE. 0.3.75 has no ``CoreModelPatcher``; there the forcing has no
effect and the tests check the same equalities on the legacy path.
"""
import pytest
import torch

from comfy_helpers import CKPT, TOGGLES, conditioning, encode, load_checkpoint, sample

pytestmark = pytest.mark.comfy

LORA = "tiny_sd15_lora.safetensors"


@pytest.fixture
def force_dynamic(comfy, monkeypatch):
    """Call it to make core hand out patchers that report DynamicVRAM (after building core's
    references on its default path); it returns whether this ComfyUI has that switch."""
    import comfy.model_patcher as mp

    class ReportsDynamic(mp.ModelPatcher):
        def is_dynamic(self):
            return True

    def force() -> bool:
        has_switch = hasattr(mp, "CoreModelPatcher")
        monkeypatch.setattr(mp, "CoreModelPatcher", ReportsDynamic, raising=False)
        return has_switch

    return force


def test_the_forcing_reaches_cores_loaders(comfy, manager, force_dynamic):
    """Core itself, given the pack's placeholders under the forced flag, fails as users saw."""
    import comfy.sd
    import folder_paths

    from comfyui_streamloader.loader import ParamStore, SafetensorsFile
    from comfyui_streamloader.loader.safetensors_file import ReadCounter

    if not force_dynamic():
        pytest.skip("ComfyUI 0.3.75 has no DynamicVRAM (no CoreModelPatcher)")
    path = folder_paths.get_full_path_or_raise("vae", "tiny_taesd.safetensors")
    store = ParamStore(SafetensorsFile(path, ReadCounter()))
    with pytest.raises(RuntimeError, match="LazyTensor"):
        comfy.sd.VAE(sd=store.lazy_state_dict())


def test_checkpoint_under_dynamic_vram_equals_core(comfy, manager, force_dynamic):
    from comfyui_streamloader.nodes.patcher import StreamModelPatcher
    from comfyui_streamloader.nodes.sampling import StreamLoaderKSampler, StreamLoaderVAEDecode

    core_model, core_clip, core_vae = _core_checkpoint(comfy)
    force_dynamic()
    model, clip, vae = load_checkpoint().args
    assert all(type(p) is StreamModelPatcher for p in (model, clip.patcher, vae.patcher)), "the pack manages all three"
    pos, neg = encode(comfy, clip)
    core_pos, core_neg = encode(comfy, core_clip)
    assert torch.equal(pos[0][0], core_pos[0][0])
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    ours = StreamLoaderKSampler.execute(model, 7, 3, 6.0, "euler", "normal", pos, neg, latent).args[0]
    core = sample(comfy, core_model, core_pos, core_neg, latent)
    assert torch.equal(ours["samples"], core)
    image = StreamLoaderVAEDecode.execute(ours, vae).args[0]
    assert torch.equal(image, comfy.VAEDecode().decode(core_vae, {"samples": core})[0])


def test_diffusion_model_and_vae_under_dynamic_vram_equal_core(comfy, manager, force_dynamic):
    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel, StreamLoaderVAE

    core_unet = comfy.UNETLoader().load_unet("tiny_sd15_unet.safetensors", "default")[0]
    core_vae = comfy.VAELoader().load_vae("tiny_taesd.safetensors")[0]
    force_dynamic()
    ours = StreamLoaderDiffusionModel.execute("tiny_sd15_unet.safetensors", weight_dtype="default", **TOGGLES).args[0]
    vae = StreamLoaderVAE.execute("tiny_taesd.safetensors", offload_to_cpu=True, eager_load=False).args[0]
    pos, neg, latent = conditioning("sd15")
    assert torch.equal(sample(comfy, ours, pos, neg, latent), sample(comfy, core_unet, pos, neg, latent))
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(comfy.VAEEncode().encode(vae, pixels)[0]["samples"],
                       comfy.VAEEncode().encode(core_vae, pixels)[0]["samples"])


def test_core_lora_on_the_packs_parts_under_dynamic_vram_equals_core(comfy, manager, force_dynamic):
    core_model, core_clip, _ = _core_checkpoint(comfy)
    force_dynamic()
    model, clip, _ = load_checkpoint().args
    ours, ours_clip = comfy.LoraLoader().load_lora(model, clip, LORA, 0.8, 0.8)
    theirs, theirs_clip = comfy.LoraLoader().load_lora(core_model, core_clip, LORA, 0.8, 0.8)
    pos, neg = encode(comfy, ours_clip)
    core_pos, core_neg = encode(comfy, theirs_clip)
    assert torch.equal(pos[0][0], core_pos[0][0])
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    assert torch.equal(sample(comfy, ours, pos, neg, latent), sample(comfy, theirs, core_pos, core_neg, latent))


def test_saving_a_partially_loaded_model_equals_core(comfy, manager):
    """Upstream saves the weights of modules left on the host (lowvram) through
    ``patch_weight_to_device(key, return_weight=True)``; the pack's patcher takes that call."""
    core_model, core_clip, _ = _core_checkpoint(comfy)
    model, clip, _ = load_checkpoint().args
    ours = comfy.LoraLoader().load_lora(model, clip, LORA, 0.8, 0.8)[0]
    theirs = comfy.LoraLoader().load_lora(core_model, core_clip, LORA, 0.8, 0.8)[0]
    ours_sd, theirs_sd = _saved_unet(ours), _saved_unet(theirs)
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)
    base = _saved_unet(model)
    assert any(not torch.equal(ours_sd[k], base[k]) for k in ours_sd), "the LoRA is in the saved weights"


def test_checkpoint_save_of_the_packs_parts_equals_cores(comfy, manager, tmp_path):
    from comfy.sd import save_checkpoint
    from safetensors.torch import load_file

    core_model, core_clip, core_vae = _core_checkpoint(comfy)
    model, clip, vae = load_checkpoint().args
    save_checkpoint(str(tmp_path / "ours.safetensors"), model, clip, vae)
    save_checkpoint(str(tmp_path / "core.safetensors"), core_model, core_clip, core_vae)
    ours, core = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "core.safetensors")
    assert ours.keys() == core.keys() and len(ours) > 100
    assert sorted(k for k in ours if not torch.equal(ours[k], core[k])) == []


def _saved_unet(model) -> dict[str, torch.Tensor]:
    """What CheckpointSave takes from a model whose every comfy op stays on the host (lowvram):
    upstream casts and patches each such weight on demand; 0.3.75 (which has no per-weight
    saving) patches them in place first (``force_patch_weights``, as its save_checkpoint does)."""
    per_weight = hasattr(model, "model_state_dict_for_saving")
    model.patch_model(device_to=model.offload_device, lowvram_model_memory=1, force_patch_weights=not per_weight)
    try:
        if not per_weight:
            return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
        sd = model.model_state_dict_for_saving(model.model.diffusion_model, "diffusion_model.")
        assert any(type(v).__name__ == "LazyCastingParam" for v in sd.values()), "the lowvram saving path ran"
        return {k: v.to("cpu").clone() for k, v in sd.items()}
    finally:
        model.unpatch_model(model.offload_device)


def _core_checkpoint(comfy):
    return comfy.CheckpointLoaderSimple().load_checkpoint(CKPT)[:3]
