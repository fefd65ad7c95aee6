import pytest

from loader import GIB, LoadOptions, resolve_budget


@pytest.mark.parametrize("max_vram, free, held, expected", [
    (0, 8 * GIB, 0, None),
    (4 * GIB, 8 * GIB, 0, 4 * GIB),
    (12 * GIB, 8 * GIB, 0, 8 * GIB),          # a cap never exceeds what is available
    (12 * GIB, 8 * GIB, 2 * GIB, 10 * GIB),   # the model's own bytes count as available to it
    (-1 * GIB, 8 * GIB, 0, 7 * GIB),          # auto: free minus headroom
    (-10 * GIB, 8 * GIB, 0, 0),
])
def test_resolve_budget(max_vram, free, held, expected):
    assert resolve_budget(max_vram, free, held) == expected


def test_ui_gigabytes_convert_once():
    assert LoadOptions.from_ui(max_vram_gb=-1.5).max_vram_bytes == -int(1.5 * GIB)


def test_no_effect_combinations_say_so():
    assert any("stream_layers" in n for n in LoadOptions(stream_layers=True).notes(has_gpu=True))
    assert any("no GPU" in n for n in LoadOptions(stream_layers=True, max_vram_bytes=GIB).notes(has_gpu=False))
    assert LoadOptions(max_vram_bytes=GIB).notes(has_gpu=True) == []
