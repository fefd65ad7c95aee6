"""The ModelManager under faults: files that do not fit the architecture, eager loads without the RAM."""
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from loader import LoadOptions, ModelFileError, ModelManager


def build_linear(entry):
    lin = torch.nn.Linear(16, 32)
    lin.load_state_dict(entry.store.lazy_state_dict())
    return lin


def write(tmp_path, name, **tensors):
    path = str(tmp_path / name)
    save_file(tensors, path)
    return path


@pytest.fixture
def good(tmp_path):
    return write(tmp_path, "good.safetensors", weight=torch.randn(32, 16), bias=torch.randn(32))


def test_a_shape_that_does_not_fit_the_architecture_names_the_file_and_tensor(tmp_path):
    path = write(tmp_path, "wide.safetensors", weight=torch.randn(33, 16), bias=torch.randn(32))
    manager = ModelManager(ram_budget_bytes=1 << 30)
    with pytest.raises(ModelFileError, match=r"tensor `weight` has shape \[33, 16\] in the file but the "
                       r"architecture ComfyUI detected needs \[32, 16\]") as info:
        manager.get_or_load(path, "net", LoadOptions(), build_linear)
    assert path in str(info.value) and "Re-export or re-download" in str(info.value)
    assert manager.entries() == []


def test_integer_data_for_floating_point_weights_is_refused(tmp_path):
    path = write(tmp_path, "ints.safetensors", weight=torch.zeros(32, 16, dtype=torch.int16), bias=torch.randn(32))
    manager = ModelManager(ram_budget_bytes=1 << 30)
    with pytest.raises(ModelFileError, match="tensor `weight` is stored as torch.int16 but the model's weights "
                       "are floating point") as info:
        manager.get_or_load(path, "net", LoadOptions(eager_load=True), build_linear)
    assert path in str(info.value) and manager.disk_bytes_read == 0


def test_other_build_errors_pass_through_unchanged(good):
    def broken(entry):
        raise KeyError("not a file fault")

    with pytest.raises(KeyError, match="not a file fault"):
        ModelManager(ram_budget_bytes=1 << 30).get_or_load(good, "net", LoadOptions(), broken)


def test_eager_load_falls_back_to_lazy_and_says_so_when_the_budget_is_short(good, caplog):
    manager, notes = ModelManager(ram_budget_bytes=1024), []
    with caplog.at_level(logging.WARNING, logger="loader.manager"):
        entry = manager.get_or_load(good, "net", LoadOptions(eager_load=True), build_linear, notes=notes)
    assert entry.store.pending_bytes == (32 * 16 + 32) * 4 and manager.disk_bytes_read == 0
    (note,) = notes
    assert note.startswith("`eager_load` fell back to lazy reads") and "STREAMLOADER_RAM_BUDGET_GB" in note
    assert any("fell back to lazy reads" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 16)
    entry.store.load_all()  # the lazy path still gives the file's weights
    weights = load_file(good)
    assert torch.equal(entry.value(x), torch.nn.functional.linear(x, weights["weight"], weights["bias"]))


def test_eager_load_reads_everything_when_it_fits(good):
    manager, notes = ModelManager(ram_budget_bytes=1 << 30), []
    entry = manager.get_or_load(good, "net", LoadOptions(eager_load=True), build_linear, notes=notes)
    assert notes == [] and entry.store.is_loaded and manager.disk_bytes_read == (32 * 16 + 32) * 4
    assert manager.available_host_bytes() <= (1 << 30) - entry.store.loaded_host_bytes
