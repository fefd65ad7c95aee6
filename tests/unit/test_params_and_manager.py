import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loader import LazyTensor, LoadOptions, ModelManager, ParamStore, SafetensorsFile
from loader.safetensors_file import ReadCounter


def make_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))


@pytest.fixture
def net_file(tmp_path):
    torch.manual_seed(0)
    net = make_net()
    net[1].running_mean.normal_()
    path = str(tmp_path / "net.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, path)
    return path


def reference(path):
    net = make_net().eval()
    net.load_state_dict(load_file(path))
    return net


def bound_net(path):
    counter = ReadCounter()
    store = ParamStore(SafetensorsFile(path, counter))
    net = make_net().eval()
    net.load_state_dict(store.lazy_state_dict())
    return net, store, counter


def param_bytes(path) -> int:
    return sum(v.nbytes for k, v in load_file(path).items() if "running" not in k and "num_batches" not in k)


def test_placeholders_cost_nothing_until_data_is_needed(net_file):
    store = ParamStore(SafetensorsFile(net_file, counter := ReadCounter()))
    sd = store.lazy_state_dict()
    assert isinstance(sd["0.weight"], LazyTensor)
    assert sd["0.weight"].shape == (32, 16) and sd["0.weight"].dtype == torch.float16
    assert counter.bytes_read == 0
    assert torch.equal(sd["0.bias"] * 1, load_file(net_file)["0.bias"])  # any other op reads that tensor
    assert counter.bytes_read == 32 * 2


def test_lazy_binding_reads_buffers_now_and_params_on_first_use(net_file):
    net, store, counter = bound_net(net_file)
    buffers = sum(v.nbytes for k, v in load_file(net_file).items() if "running" in k or "num_batches" in k)
    assert counter.bytes_read == buffers
    assert store.pending_bytes == param_bytes(net_file)
    assert store.load_all() == param_bytes(net_file)
    assert counter.bytes_read == buffers + param_bytes(net_file)
    assert store.load_all() == 0, "each tensor is read at most once"
    x = torch.randn(3, 16)
    assert torch.equal(net(x), reference(net_file)(x))


def test_load_module_reads_only_that_module(net_file):
    net, store, counter = bound_net(net_file)
    before = counter.bytes_read
    store.load_module(net[2])
    assert counter.bytes_read - before == (32 * 4 + 4) * 2
    assert not store.is_loaded


def test_matching_dtype_is_read_in_place(tmp_path):
    path = str(tmp_path / "f32.safetensors")
    save_file({"weight": torch.randn(8, 8), "bias": torch.randn(8)}, path)
    lin = torch.nn.Linear(8, 8)
    store = ParamStore(SafetensorsFile(path, ReadCounter()))
    lin.load_state_dict(store.lazy_state_dict())
    ptr = lin.weight.data_ptr()
    store.load_all()
    assert lin.weight.data_ptr() == ptr
    assert torch.equal(lin.weight, load_file(path)["weight"])


def test_shape_mismatch_is_refused(net_file):
    store = ParamStore(SafetensorsFile(net_file, ReadCounter()))
    with pytest.raises(RuntimeError, match="size mismatch"):
        torch.nn.Linear(16, 33).load_state_dict({k[2:]: v for k, v in store.lazy_state_dict().items() if k.startswith("0.")})


def build_net(entry):
    net = make_net().eval()
    net.load_state_dict(entry.store.lazy_state_dict())
    return net


def write_nets(tmp_path, n):
    paths = []
    for i in range(n):
        path = str(tmp_path / f"net{i}.safetensors")
        save_file({k: v for k, v in make_net().state_dict().items()}, path)
        paths.append(path)
    return paths


def test_manager_shares_one_copy_and_reads_nothing_when_warm(net_file):
    manager = ModelManager(ram_budget_bytes=1 << 30)
    first = manager.get_or_load(net_file, "net", LoadOptions(eager_load=True), build_net)
    read = manager.disk_bytes_read
    assert read > 0
    second = manager.get_or_load(net_file, "net", LoadOptions(stream_layers=True, eager_load=True), build_net)
    assert second is first and manager.disk_bytes_read == read
    other_dtype = manager.get_or_load(net_file, "net", LoadOptions(weight_dtype="fp8_e4m3fn"), build_net)
    assert other_dtype is not first


def test_lazy_load_reads_nothing_at_load(net_file):
    manager = ModelManager(ram_budget_bytes=1 << 30)
    entry = manager.get_or_load(net_file, "net", LoadOptions(eager_load=False), build_net)
    assert entry.store.pending_bytes == param_bytes(net_file)
    assert manager.stats()["models"][0]["host_resident_bytes"] == 0


def test_lru_eviction_under_ram_budget(tmp_path):
    paths = write_nets(tmp_path, 3)
    one = ModelManager(ram_budget_bytes=1 << 30).get_or_load(paths[0], "net", LoadOptions(), build_net).host_bytes
    manager = ModelManager(ram_budget_bytes=2 * one)
    evicted = []
    for path in paths[:2]:
        manager.get_or_load(path, "net", LoadOptions(), build_net).on_evict.append(lambda p=path: evicted.append(p))
    manager.get_or_load(paths[0], "net", LoadOptions(), build_net)  # paths[1] is now least recently used
    manager.get_or_load(paths[2], "net", LoadOptions(), build_net)
    held = [m["path"] for m in manager.stats()["models"]]
    assert held == [os.path.realpath(paths[0]), os.path.realpath(paths[2])]
    assert evicted == [paths[1]] and manager.evictions == 1


def test_a_changed_file_gets_a_new_key_and_is_read_again(net_file):
    manager = ModelManager(ram_budget_bytes=1 << 30)
    first = manager.get_or_load(net_file, "net", LoadOptions(eager_load=True), build_net)
    save_file({k: v for k, v in make_net().state_dict().items()}, net_file)
    os.utime(net_file, ns=(10**18, 10**18))
    second = manager.get_or_load(net_file, "net", LoadOptions(eager_load=True), build_net)
    assert second is not first and second.key != first.key
    assert manager.reloads == 1 and len(manager.entries()) == 1
    x = torch.randn(2, 16)
    assert torch.equal(second.value(x), reference(net_file)(x))


def test_release_all_drops_everything(net_file):
    manager = ModelManager(ram_budget_bytes=1 << 30)
    manager.get_or_load(net_file, "net", LoadOptions(), build_net)
    assert manager.release_all() == 1 and manager.stats()["models"] == []


@pytest.mark.parametrize("bad", [{"weight_dtype": "fp4"}, {"max_vram_bytes": 1.5}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="`"):
        LoadOptions(**bad)


def test_an_interrupted_eager_read_leaves_every_tensor_read_or_pending(tmp_path):
    """ComfyUI's progress hook raises on an interrupt: what was read stays, the rest is read later."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(48)])
    path = str(tmp_path / "deep.safetensors")
    save_file(net.state_dict(), path)
    store = ParamStore(SafetensorsFile(path, ReadCounter()))
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(48)])
    model.load_state_dict(store.lazy_state_dict())

    def interrupt(done, total):
        raise KeyboardInterrupt("interrupted from the progress hook")

    with pytest.raises(KeyboardInterrupt):
        store.load_all(interrupt)
    pending = store.pending_bytes
    assert store.load_all() == pending, "the rest is read once, later"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
