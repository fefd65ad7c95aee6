"""A registration ComfyUI refuses: 0.3.75 leaves CUDA's error set, so the pack drops it itself."""
import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.mark.parametrize("comfy_drops_it", [False, True], ids=["0.3.75", "upstream"])
def test_a_failed_registration_leaves_no_cuda_error_behind(pack, monkeypatch, comfy_drops_it):
    import comfy.model_management as mm

    from comfyui_streamloader.nodes import pinning

    cleared = []
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 1 << 30)
    monkeypatch.setattr(mm, "pin_memory", lambda tensor: False)  # cudaHostRegister failed
    monkeypatch.setattr(pinning, "clear_cuda_error", lambda: cleared.append(1))
    if comfy_drops_it:
        monkeypatch.setattr(mm, "discard_cuda_async_error", lambda: None, raising=False)
    else:
        monkeypatch.delattr(mm, "discard_cuda_async_error", raising=False)
    book = pinning.ComfyPinnedBook(cap_bytes=1 << 30)
    assert not book.register(torch.empty(4096, dtype=torch.uint8))
    assert cleared == ([] if comfy_drops_it else [1])
    assert book.own_bytes == 0
