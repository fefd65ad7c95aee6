"""One pinned-memory book: the pack's slabs are registered in ComfyUI's own accounting."""
import pytest
import torch

pytestmark = pytest.mark.comfy

_MIB = 1 << 20


def test_the_packs_pins_and_comfyuis_share_one_cap(pack, monkeypatch):
    import comfy.model_management as mm

    from comfyui_streamloader.nodes.pinning import ComfyPinnedBook

    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 4 * _MIB)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 4 * _MIB - 4096)  # ComfyUI pinned nearly all of it
    if hasattr(mm, "ensure_pin_registerable"):
        # Upstream makes room by evicting ComfyUI's real pins (earlier tests leave some on a GPU),
        # which takes their bytes off the faked total: the pins counted here are fakes to keep.
        monkeypatch.setattr(mm, "ensure_pin_registerable", lambda size, evict_active=True: 0)
    book = ComfyPinnedBook(cap_bytes=1 << 30)
    assert book.cap_bytes == 4 * _MIB, "the smaller of ComfyUI's cap and the pack's"
    assert not book.register(torch.empty(8192, dtype=torch.uint8)), "over the shared cap: left pageable"
    assert mm.TOTAL_PINNED_MEMORY == 4 * _MIB - 4096
    assert book.report() == {"pinned_bytes": 0, "pinned_by_comfyui_bytes": 4 * _MIB - 4096,
                             "pinned_cap_bytes": 4 * _MIB}


def test_without_comfyuis_pinning_the_pack_pins_nothing(pack, monkeypatch):
    import comfy.model_management as mm

    from comfyui_streamloader.nodes.pinning import ComfyPinnedBook

    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1)  # --disable-pinned-memory, or --cpu
    book = ComfyPinnedBook(cap_bytes=1 << 30)
    assert book.cap_bytes == 0 and not book.register(torch.empty(4096, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_a_slab_is_page_locked_through_comfyui_and_released(pack):
    import comfy.model_management as mm

    from comfyui_streamloader.nodes.pinning import ComfyPinnedBook

    if mm.MAX_PINNED_MEMORY <= 0:
        pytest.skip("ComfyUI runs with pinned memory disabled")
    book, slab = ComfyPinnedBook(), torch.empty(8 * _MIB, dtype=torch.uint8)
    before = mm.TOTAL_PINNED_MEMORY
    assert book.register(slab) and slab.is_pinned()
    assert mm.TOTAL_PINNED_MEMORY == before + slab.nbytes and book.report()["pinned_bytes"] == slab.nbytes
    book.unregister(slab)
    assert not slab.is_pinned() and mm.TOTAL_PINNED_MEMORY == before
