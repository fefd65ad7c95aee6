"""The pack's nodes in-process on the tiny models, against core's loaders, bit for bit (CPU or GPU)."""
import pytest
import torch

from comfy_helpers import CKPT, TOGGLES, conditioning, encode, load_checkpoint, sample, settled

pytestmark = pytest.mark.comfy


def test_checkpoint_equals_core_bit_for_bit(comfy, manager):
    from comfyui_streamloader.nodes.sampling import StreamLoaderKSampler, StreamLoaderVAEDecode

    model, clip, vae = load_checkpoint().args
    core_model, core_clip, core_vae = comfy.CheckpointLoaderSimple().load_checkpoint(CKPT)[:3]
    pos, neg = encode(comfy, clip)
    core_pos, core_neg = encode(comfy, core_clip)
    assert torch.equal(pos[0][0], core_pos[0][0])
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    core = sample(comfy, core_model, core_pos, core_neg, latent)
    assert torch.equal(sample(comfy, model, pos, neg, latent), core), "core KSampler on the pack's MODEL"
    ours = StreamLoaderKSampler.execute(model, 7, 3, 6.0, "euler", "normal", pos, neg, latent).args[0]
    assert torch.equal(ours["samples"], core)
    image = settled(vae.device, lambda: StreamLoaderVAEDecode.execute(ours, vae).args[0])
    core_image = settled(core_vae.device, lambda: comfy.VAEDecode().decode(core_vae, {"samples": core})[0])
    assert torch.equal(image, core_image)
    assert torch.equal(comfy.VAEDecode().decode(vae, ours)[0], image), "core VAEDecode on the pack's VAE"


def test_lazy_checkpoint_reads_each_part_once_on_first_use(comfy, manager):
    start = manager.disk_bytes_read
    model, clip, vae = load_checkpoint().args
    assert manager.disk_bytes_read == start
    pos, neg = encode(comfy, clip)
    after_clip = manager.disk_bytes_read
    assert after_clip > start
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    samples = sample(comfy, model, pos, neg, latent)
    after_unet = manager.disk_bytes_read
    comfy.VAEDecode().decode(vae, {"samples": samples})
    total = manager.disk_bytes_read
    assert after_clip < after_unet < total <= start + manager.entries()[0].store.file.header.data_bytes
    model2, clip2, vae2 = load_checkpoint(stream_layers=True).args  # a toggle that keeps the bytes
    encode(comfy, clip2)
    sample(comfy, model2, pos, neg, latent)
    assert manager.disk_bytes_read == total


def test_eager_load_reads_everything_in_the_loader(comfy, manager):
    from comfyui_streamloader.nodes.sampling import StreamLoaderKSampler

    start = manager.disk_bytes_read
    model, clip, _ = load_checkpoint(eager_load=True).args
    read = manager.disk_bytes_read
    assert read - start == manager.entries()[0].store.file.header.data_bytes - _unbound_bytes(manager)
    assert manager.entries()[0].store.is_loaded
    pos, neg = encode(comfy, clip)
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    out = StreamLoaderKSampler.execute(model, 1, 2, 5.0, "euler", "normal", pos, neg, latent)
    assert manager.disk_bytes_read == read
    assert out.ui["text"][0].startswith("disk read: 0.0 MiB")


def _unbound_bytes(manager) -> int:
    """Bytes of file tensors no parameter takes (ComfyUI ignores them), never read."""
    store = manager.entries()[0].store
    bound = {b.entry.name for b in store._bindings}
    return sum(e.nbytes for name, e in store.file.header.tensors.items() if name not in bound)


@pytest.mark.parametrize("unet_name, kind", [("tiny_sd15_unet.safetensors", "sd15"),
                                             ("tiny_sd3_mmdit.safetensors", "sd3")])
def test_diffusion_model_equals_core_unet_loader(comfy, manager, unet_name, kind):
    from comfyui_streamloader.nodes.loaders import StreamLoaderDiffusionModel

    ours = StreamLoaderDiffusionModel.execute(unet_name, weight_dtype="default", **TOGGLES).args[0]
    core = comfy.UNETLoader().load_unet(unet_name, "default")[0]
    pos, neg, latent = conditioning(kind)
    assert torch.equal(sample(comfy, ours, pos, neg, latent), sample(comfy, core, pos, neg, latent))


def test_vae_loader_equals_core(comfy, manager):
    from comfyui_streamloader.nodes.loaders import StreamLoaderVAE
    from comfyui_streamloader.nodes.sampling import StreamLoaderVAEEncode

    ours = StreamLoaderVAE.execute("tiny_taesd.safetensors", offload_to_cpu=True, eager_load=False).args[0]
    core = comfy.VAELoader().load_vae("tiny_taesd.safetensors")[0]
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    latent = settled(ours.device, lambda: StreamLoaderVAEEncode.execute(pixels, ours).args[0])
    core_latent = settled(core.device, lambda: comfy.VAEEncode().encode(core, pixels)[0]["samples"])
    assert torch.equal(latent["samples"], core_latent)
    assert torch.equal(comfy.VAEDecode().decode(ours, latent)[0], comfy.VAEDecode().decode(core, latent)[0])


def test_core_lora_loader_on_the_packs_model_equals_core(comfy, manager):
    model, clip, _ = load_checkpoint().args
    core_model, core_clip = comfy.CheckpointLoaderSimple().load_checkpoint(CKPT)[:2]
    lora = "tiny_sd15_lora.safetensors"
    ours, ours_clip = comfy.LoraLoader().load_lora(model, clip, lora, 0.8, 0.8)
    theirs, theirs_clip = comfy.LoraLoader().load_lora(core_model, core_clip, lora, 0.8, 0.8)
    pos, neg = encode(comfy, ours_clip)
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    with_lora = sample(comfy, ours, pos, neg, latent)
    assert torch.equal(with_lora, sample(comfy, theirs, pos, neg, latent))
    assert not torch.equal(with_lora, sample(comfy, model, pos, neg, latent)), "the LoRA changes the output"


def test_clone_keeps_the_patcher_type_and_options(comfy, manager):
    from comfyui_streamloader.nodes.patcher import StreamModelPatcher

    model = load_checkpoint(max_vram_gb=2.0).args[0]
    clone = model.clone()
    assert type(clone) is StreamModelPatcher and clone.is_clone(model)
    assert clone.stream_options == model.stream_options and clone.stream_entry is model.stream_entry


def test_toggles_without_effect_say_so_on_the_node(comfy, manager, comfy_device):
    out = load_checkpoint(stream_layers=True, offload_to_cpu=False)
    assert any("`stream_layers` has no effect" in line for line in out.ui["text"])
    out = load_checkpoint(max_vram_gb=1.0)
    cpu_only_note = any("`max_vram_gb` has no effect" in line for line in out.ui["text"])
    assert cpu_only_note == (comfy_device == "cpu"), "a VRAM cap has no effect without a GPU, and only then"


def test_a_bad_model_file_gets_a_clear_error_and_the_next_run_works(comfy, manager, models_dir, tmp_path):
    import folder_paths

    from comfyui_streamloader.loader import ModelFileError
    from comfyui_streamloader.nodes.loaders import StreamLoaderCheckpoint

    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    with pytest.raises(ModelFileError, match="broken.safetensors.*not valid JSON"):
        StreamLoaderCheckpoint.execute("broken.safetensors", **TOGGLES)
    assert load_checkpoint().args[0] is not None
