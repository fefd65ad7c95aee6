"""The streaming engine on the simulated device: exact output, the budget, the ring, interrupts."""
import pytest
import torch
from torch import nn

from loader import BudgetTooSmallError, StreamEngine, plan_residency
from loader.blocks import discover_blocks
from loader.config import StreamConfig
from loader.device import SimulatedDevice
from loader.pinning import PinnedBook

WIDTH, DEPTH = 64, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyDiT(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Linear(8, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.final = nn.Linear(WIDTH, 8)
        self.register_buffer("scale", torch.tensor(0.5))
        self.to(dtype)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.final(x) * self.scale


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return TinyDiT(dtype).eval()


def block_bytes(engine):
    return engine.unit_bytes[0]


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(4, 8)


@pytest.fixture
def reference(x):
    with torch.inference_mode():
        return make_model()(x)


def stepped(engine, model, x):
    """One step: a forward of the model, bracketed as ComfyUI's model-function wrapper does."""
    with engine.step((tuple(x.shape),)):
        return model(x)


SPREAD = StreamConfig(plan_from_profile=False)  # the plan before a profile, kept for the whole run


def streamed(budget_fraction, x, steps=3, depth=None, dtype=torch.float32, config=SPREAD):
    model = make_model(dtype)
    engine = StreamEngine(model, model, config=config)
    device = SimulatedDevice()
    slots = (1 if depth is None else depth) + 1
    budget = engine.fixed_bytes + int(budget_fraction * sum(engine.unit_bytes)) + slots * block_bytes(engine)
    plan = engine.attach(device, budget, depth)
    with torch.inference_mode():
        outs = [stepped(engine, model, x.to(dtype)) for _ in range(steps)]
    return model, engine, device, plan, outs


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.625])
def test_streamed_output_is_bit_identical_to_resident(fraction, x, reference):
    model, engine, device, plan, outs = streamed(fraction, x)
    assert all(torch.equal(out, reference) for out in outs)
    assert engine.figures.streamed_units == DEPTH - len(plan.resident) > 0
    assert engine.figures.steps == 3
    per_step = sum(engine.unit_bytes[i] for i in range(DEPTH) if i not in plan.resident)
    # The last block of a step prefetches the first streamed blocks of the next one.
    prefetched_ahead = plan.prefetch_depth * block_bytes(engine)
    assert 3 * per_step <= engine.figures.streamed_bytes <= 3 * per_step + prefetched_ahead


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.625])
def test_device_bytes_never_exceed_the_budget(fraction, x):
    model, engine, device, plan, _ = streamed(fraction, x)
    assert device.peak_bytes <= plan.budget_bytes
    assert engine.figures.peak_device_bytes == device.held_bytes == plan.device_bytes(engine.unit_bytes)


def test_weights_read_from_host_outside_a_forward(x):
    model, engine, device, plan, _ = streamed(0.25, x)
    streamed_block = next(i for i in range(DEPTH) if i not in plan.resident)
    w = model.blocks[streamed_block].mlp[0].weight
    assert w.data_ptr() == engine.units[streamed_block].slab.data_ptr() + engine.units[streamed_block].specs[2].offset


def test_detach_restores_host_weights_and_frees_the_device(x, reference):
    model, engine, device, plan, _ = streamed(0.5, x)
    engine.detach()
    assert device.held_bytes == 0
    with torch.inference_mode():
        assert torch.equal(model(x), reference)
    assert all(p.data_ptr() != 0 for p in model.parameters())


def test_resident_units_are_spread_over_the_stack():
    plan = plan_residency([100] * 8, fixed_bytes=10, budget_bytes=10 + 400 + 200)
    assert plan.resident == {0, 2, 4, 6}
    quarter = plan_residency([100] * 8, fixed_bytes=10, budget_bytes=10 + 200 + 200)
    assert quarter.resident == {1, 5}
    assert plan.slots == 2 and plan.slot_bytes == 100


def test_everything_resident_when_it_fits():
    plan = plan_residency([100] * 8, fixed_bytes=10, budget_bytes=810)
    assert plan.resident == set(range(8)) and plan.slots == 0


def test_budget_below_minimum_names_it(x):
    model = make_model()
    engine = StreamEngine(model, model)
    with pytest.raises(BudgetTooSmallError, match=r"minimum of 0\.\d+ GiB") as err:
        engine.attach(SimulatedDevice(), 1024)
    assert err.value.minimum_bytes > 1024
    assert "max_vram_gb" in str(err.value)


def test_one_slot_budget_streams_synchronously(x, reference):
    model = make_model()
    engine = StreamEngine(model, model)
    plan = engine.attach(SimulatedDevice(), engine.fixed_bytes + block_bytes(engine) * 3 // 2)
    with torch.inference_mode():
        assert torch.equal(stepped(engine, model, x), reference)
    assert plan.slots == 1 and plan.prefetch_depth == 0


def test_prefetch_follows_the_learned_order(x):
    model, engine, device, plan, _ = streamed(0.0, x, steps=2, depth=2)
    assert plan.slots == 3
    assert engine.snapshot().order == tuple(f"blocks.{i}" for i in range(DEPTH) if i not in plan.resident)


def test_interrupt_mid_step_leaves_nothing_in_flight(x, reference):
    model = make_model()
    engine = StreamEngine(model, model)
    calls = {"n": 0}

    class Interrupted(BaseException):  # newer ComfyUI's InterruptProcessingException is no Exception
        pass

    def interrupt_on_third_block():
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted()

    device = SimulatedDevice()
    budget = engine.fixed_bytes + 3 * block_bytes(engine)
    engine.attach(device, budget, check_interrupt=interrupt_on_third_block)
    with torch.inference_mode(), pytest.raises(Interrupted):
        stepped(engine, model, x)
    snapshot = engine.snapshot()
    assert snapshot.attached and not snapshot.entered and not snapshot.held
    assert device.held_bytes <= budget
    with torch.inference_mode():
        assert torch.equal(stepped(engine, model, x), reference)


def test_shrink_frees_device_memory_and_stays_exact(x, reference):
    model, engine, device, plan, _ = streamed(0.75, x)
    held = engine.held_bytes
    freed = engine.shrink(2 * block_bytes(engine))
    assert freed >= 2 * block_bytes(engine) and device.held_bytes == held - freed
    with torch.inference_mode():
        assert torch.equal(stepped(engine, model, x), reference)


def test_out_of_memory_retry_plans_smaller(x):
    model, engine, device, plan, _ = streamed(0.75, x)
    held = engine.held_bytes
    assert engine.retry_smaller(torch.OutOfMemoryError("CUDA out of memory"))
    assert engine.held_bytes < held
    assert "retried once" in engine.figures.notes[0]


def test_pinned_memory_is_capped_and_counted(x):
    model = make_model()
    engine = StreamEngine(model, model)
    device = SimulatedDevice(pinned=PinnedBook(cap_bytes=3 * block_bytes(engine)))
    engine.attach(device, engine.fixed_bytes + 2 * block_bytes(engine))
    assert device.pinned_bytes == 3 * block_bytes(engine)
    assert sum(u.pinned_on is not None for u in engine.units) == 3
    assert "5 streamed units" in engine.figures.notes[0] and "not page-locked" in engine.figures.notes[0]
    engine.close()
    assert device.pinned_bytes == 0 and device.held_bytes == 0


def test_copies_from_memory_not_page_locked_are_counted(x):
    """What the device finds at each copy, not what the books say: a slab unregistered behind the
    engine's back (by ComfyUI, say) counts from then on."""
    model = make_model()
    engine = StreamEngine(model, model, config=SPREAD)
    device = SimulatedDevice(pinned=PinnedBook(cap_bytes=3 * block_bytes(engine)))
    engine.attach(device, engine.fixed_bytes + 2 * block_bytes(engine))
    with torch.inference_mode():
        stepped(engine, model, x)
    before = engine.figures
    assert 0 < before.pageable_bytes < before.streamed_bytes
    pinned = next(u for u in engine.units if u.pinned_on is not None)
    device.pinned.unregister(pinned.slab)  # its unit still says pinned_on
    engine.begin_run()
    with torch.inference_mode():
        stepped(engine, model, x)
    after = engine.figures
    assert after.streamed_bytes == before.streamed_bytes
    assert after.pageable_bytes == before.pageable_bytes + pinned.nbytes


def test_memory_pinned_by_comfyui_counts_against_the_cap(x):
    model = make_model()
    engine = StreamEngine(model, model)
    device = SimulatedDevice(pinned=_PinnedByOthers(cap_bytes=3 * block_bytes(engine), others=block_bytes(engine)))
    engine.attach(device, engine.fixed_bytes + 2 * block_bytes(engine))
    assert device.pinned_bytes == 2 * block_bytes(engine), "ComfyUI's pinned bytes and the pack's share one cap"
    assert device.pinned.report()["pinned_by_comfyui_bytes"] == block_bytes(engine)


class _PinnedByOthers(PinnedBook):
    def __init__(self, cap_bytes: int, others: int):
        super().__init__(cap_bytes)
        self._others = others

    def others_bytes(self) -> int:
        return self._others


def test_stored_dtype_streams_as_stored(x):
    model, engine, device, plan, outs = streamed(0.25, x, dtype=torch.bfloat16)
    assert engine.units[0].specs[2].dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(outs[0], make_model(torch.bfloat16)(x.bfloat16()))


def test_discovery_falls_back_to_the_longest_uniform_list():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
            self.heads = nn.ModuleList([nn.Linear(4, 4), nn.Conv1d(4, 4, 1)])

    names = [name for name, _ in discover_blocks(Odd())]
    assert names == [f"stages.{i}" for i in range(5)]


def test_slab_tensors_start_on_page_boundaries():
    """So ComfyUI's per-tensor pinning (its lowvram path) never finds a page already registered."""
    engine = StreamEngine(make_model(), make_model())
    assert all((u.slab.data_ptr() + s.offset) % 4096 == 0 for u in engine.units for s in u.specs)


def test_weights_moved_away_return_to_their_slab(x, reference):
    """ComfyUI's module.to() gives parameters new memory; unpatched ones go back to the slab."""
    model = make_model()
    engine = StreamEngine(model, model)
    first = model.blocks[0].mlp[0]
    first.weight.data = first.weight.data.clone()  # what a round trip through another device leaves
    assert not engine.units[0].specs[2].holds(engine.units[0].slab)
    assert engine.restore_host_views(lambda spec: True) == 1
    assert engine.units[0].specs[2].holds(engine.units[0].slab)
    with torch.inference_mode():
        assert torch.equal(model(x), reference)


def test_inference_mode_parameters_survive_attach_and_detach_outside_it(x, reference):
    """ComfyUI builds models under inference mode and unloads them outside it."""
    with torch.inference_mode():
        model = make_model()
        engine = StreamEngine(model, model)
    engine.attach(SimulatedDevice(), engine.fixed_bytes + 3 * block_bytes(engine))
    engine.detach()
    engine.restore_host_views(lambda spec: True)
    with torch.inference_mode():
        assert torch.equal(model(x), reference)


class Interleaved(nn.Module):
    """A block whose first layer runs again after the second, as attention projections do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.a(torch.relu(self.b(self.a(x))))


class InterleavedStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Interleaved() for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_chunks_of_a_block_stream_each_once_per_step():
    torch.manual_seed(0)
    model = InterleavedStack().eval()
    x = torch.randn(2, WIDTH)
    with torch.inference_mode():
        expected = model(x)
    engine = StreamEngine(model, model, chunk_bytes=1)  # every layer a chunk of its own
    assert [u.name for u in engine.units[:2]] == ["blocks.0[0]", "blocks.0[1]"]
    engine.attach(SimulatedDevice(), engine.fixed_bytes + 2 * max(engine.unit_bytes))
    with torch.inference_mode():
        for _ in range(2):  # the first step learns the order (`a` entered twice); the second starts from it
            assert torch.equal(stepped(engine, model, x), expected)
        before = engine.figures.streamed_bytes
        for _ in range(3):
            assert torch.equal(stepped(engine, model, x), expected)
    assert engine.figures.streamed_bytes - before == 3 * sum(engine.unit_bytes), "no chunk copied twice a step"


def test_blocks_over_twice_the_chunk_size_stream_in_chunks(x, reference):
    model = make_model()
    block = block_bytes(StreamEngine(model, model, chunk_bytes=0))
    assert len(StreamEngine(model, model, chunk_bytes=block // 2).units) == DEPTH, "not over twice: whole blocks"
    norm_bytes = sum(p.nbytes for p in model.blocks[0].norm.parameters())
    split = StreamEngine(model, model, chunk_bytes=64 * norm_bytes + 64)  # just over the norm's 64x, under half a block
    assert len(split.units) == 2 * DEPTH and max(split.unit_bytes) < block, "two linears; the norm stays resident"
    assert not any(s.module is model.blocks[0].norm for u in split.units for s in u.specs)
    plan = split.attach(SimulatedDevice(), split.fixed_bytes + 2 * max(split.unit_bytes))
    assert plan.minimum_bytes < split.fixed_bytes + block, "smaller units lower the minimum budget"
    with torch.inference_mode():
        assert torch.equal(stepped(split, model, x), reference)
