"""Chunks grouped in call order: a block that registers its layers in one order and calls them in
another (Flux's double blocks: image layers, then text layers, called interleaved) is packed again
after its first streamed step, so each chunk is entered once a step. Simulated device, virtual clock."""
import gc
import weakref

import pytest
import torch
from torch import nn

from loader import StreamEngine
from loader.config import StreamConfig
from loader.device import SimulatedDevice

WIDTH = 32
LINEAR_BYTES = WIDTH * WIDTH * 4  # float32, no bias


class DoubleStream(nn.Module):
    """Registered image-then-text; called modulation, attention, MLP, each image then text."""

    def __init__(self):
        super().__init__()
        for stream in ("img", "txt"):
            for part in ("mod", "attn", "mlp"):
                setattr(self, f"{stream}_{part}", nn.Linear(WIDTH, WIDTH, bias=False))

    def forward(self, x):
        img, txt = x, x.flip(0)
        for part in ("mod", "attn", "mlp"):
            img = img + torch.tanh(getattr(self, f"img_{part}")(img))
            txt = txt + torch.tanh(getattr(self, f"txt_{part}")(txt))
        return img + txt


class Stack(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(DoubleStream() for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Stack().eval()


@pytest.fixture
def x():
    return torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(1))


def engine_for(model, **config):
    """Chunks of two linears: registration groups (img_mod, img_attn), (img_mlp, txt_mod), (txt_attn, txt_mlp)."""
    return StreamEngine(model, model, config=StreamConfig(chunk_bytes=2 * LINEAR_BYTES, plan_from_profile=False,
                                                          **config))


def steps(engine, model, x, n):
    with torch.inference_mode():
        out = []
        for _ in range(n):
            with engine.step((tuple(x.shape),)):
                out.append(model(x))
        return out


def groups(engine, block):
    names = {id(m): n for n, m in block.named_modules()}
    return [sorted(names[id(m)] for m in u.modules) for u in engine.units if u.module is block]


def test_a_block_called_out_of_registration_order_is_regrouped_once_and_stays_exact(model, x):
    with torch.inference_mode():
        expected = model(x)
    engine = engine_for(model)
    block = model.blocks[0]
    assert groups(engine, block) == [["img_attn", "img_mod"], ["img_mlp", "txt_mod"], ["txt_attn", "txt_mlp"]]
    old = weakref.ref(engine.units[0])
    device = SimulatedDevice()
    engine.attach(device, engine.fixed_bytes + 2 * max(engine.unit_bytes))  # everything streams
    assert all(torch.equal(out, expected) for out in steps(engine, model, x, 3))
    assert groups(engine, block) == [["img_mod", "txt_mod"], ["img_attn", "txt_attn"], ["img_mlp", "txt_mlp"]]
    assert [u.name for u in engine.units[:3]] == ["blocks.0[0]", "blocks.0[1]", "blocks.0[2]"]
    order = engine.snapshot().order
    assert sorted(order) == sorted(u.name for u in engine.units), "each chunk entered once a step"
    before = engine.figures.streamed_bytes
    steps(engine, model, x, 2)
    assert engine.figures.streamed_bytes - before == 2 * sum(engine.unit_bytes)
    gc.collect()
    assert old() is None, "the old units (and their slabs) are gone"
    assert device.pinned_bytes == sum(engine.unit_bytes), "the old slabs are unpinned, the new ones pinned"
    slab_ptrs = [(u.slab.data_ptr(), u.slab.data_ptr() + u.nbytes) for u in engine.units]
    engine.detach()
    for p in model.parameters():  # every parameter back on a new slab
        assert any(a <= p.data_ptr() < b for a, b in slab_ptrs)
    assert torch.equal(model(x), expected)


def test_regrouping_can_be_turned_off(model, x):
    engine = engine_for(model, chunks_in_call_order=False)
    engine.attach(SimulatedDevice(), engine.fixed_bytes + 2 * max(engine.unit_bytes))
    units = list(engine.units)
    steps(engine, model, x, 2)
    assert engine.units == units
    assert len(engine.snapshot().order) == 2 * len(units), "registration chunks: each entered twice a step"


def test_a_resident_model_is_not_regrouped(model, x):
    engine = engine_for(model)
    engine.attach(SimulatedDevice(), None)
    units = list(engine.units)
    steps(engine, model, x, 2)
    assert engine.units == units, "nothing streams: the chunks do not matter yet"


def test_a_patched_weight_keeps_its_patch_and_the_slab_keeps_the_original(model, x):
    """ComfyUI's LoRA patching replaces a parameter; the regrouped slab holds the unpatched bytes."""
    engine = engine_for(model)
    layer = model.blocks[1].txt_mod
    original = layer.weight.detach().clone()
    patched = nn.Parameter(original + 1, requires_grad=False)
    layer.weight = patched
    engine.attach(SimulatedDevice(), engine.fixed_bytes + 2 * max(engine.unit_bytes))
    with torch.inference_mode():
        expected = model(x)
    assert all(torch.equal(out, expected) for out in steps(engine, model, x, 2)), "the patch still applies"
    engine.detach()
    unit = next(u for u in engine.units if any(s.module is layer for s in u.specs))
    spec = next(s for s in unit.specs if s.module is layer)
    assert torch.equal(spec.view(unit.slab), original)
    assert torch.equal(layer.weight, patched)


def test_an_interrupted_first_step_regroups_at_the_next(model, x):
    engine = engine_for(model)
    engine.attach(SimulatedDevice(), engine.fixed_bytes + 2 * max(engine.unit_bytes))
    units = list(engine.units)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode(), engine.step((tuple(x.shape),)):
        model.blocks[0](x)
        raise KeyboardInterrupt
    assert engine.units == units
    steps(engine, model, x, 1)
    assert engine.units != units


def test_blocks_are_regrouped_one_at_a_time(model, x, monkeypatch):
    """Host memory grows by one block at most: a block's old slabs are gone before the next is packed."""
    import loader.chunking as chunking

    replaced, repack = [], chunking.repack

    def one_at_a_time(name, units, chunks):
        gc.collect()
        assert all(ref() is None for ref in replaced), f"an earlier block's old units are alive at {name}"
        replaced.extend(weakref.ref(obj) for u in units for obj in (u, u.slab))
        return repack(name, units, chunks)

    monkeypatch.setattr(chunking, "repack", one_at_a_time)
    engine = engine_for(model)
    engine.attach(SimulatedDevice(), engine.fixed_bytes + 2 * max(engine.unit_bytes))
    steps(engine, model, x, 1)
    assert len(replaced) == 2 * len(engine.units)
