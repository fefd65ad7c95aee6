"""The engine on the simulated device's virtual clock: the byte ring, call order, copies at
placement, and the plan from a profiled step. Times are the virtual clock's, never wall-clock."""
import pytest
import torch
from torch import nn

from loader import StreamEngine
from loader.config import StreamConfig
from loader.device import SimulatedDevice
from loader.planner import plan_for_profile
from loader.simulator import simulate

WIDTH = 64
BANDWIDTH = 1e9  # bytes/s of the simulated copies


class Modulated(nn.Module):
    """A block whose modulation is registered last but runs first (as in Flux and MMDiT)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.modulation = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x * self.modulation(x))))


class Stack(nn.Module):
    def __init__(self, depth=6):
        super().__init__()
        self.embed = nn.Linear(8, WIDTH)
        self.blocks = nn.ModuleList(Modulated() for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def compute_seconds(name, nbytes):
    """The up-projection chunks are compute-heavy, the others cheap: compute is not bytes."""
    return 4 * nbytes / BANDWIDTH if name.endswith("[0]") else nbytes / (8 * BANDWIDTH)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Stack().eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(4, 8)


def chunked(model, config=StreamConfig()):
    """Each linear a chunk of its own: [0] up, [1] down, [2] modulation (registration order)."""
    return StreamEngine(model, model, config=StreamConfig(**{**config.__dict__, "chunk_bytes": 1}))


def device():
    return SimulatedDevice(bandwidth=BANDWIDTH, compute=compute_seconds)


def run(model, x, steps, engine=None):
    """``steps`` forwards, each a step of ``engine`` (bracketed as ComfyUI's model-function wrapper does)."""
    with torch.inference_mode():
        return [_step(engine, model, x) for _ in range(steps)]


def _step(engine, model, x):
    if engine is None:
        return model(x)
    with engine.step((tuple(x.shape),)):
        return model(x)


def test_chunks_are_copied_in_call_order_after_the_first_step(model, x):
    (expected,) = run(model, x, 1)
    engine = chunked(model, StreamConfig(plan_from_profile=False))
    engine.attach(device(), engine.fixed_bytes + 3 * max(engine.unit_bytes))
    assert all(torch.equal(out, expected) for out in run(model, x, 2, engine))
    snapshot = engine.snapshot()
    called = [f"blocks.{b}[{k}]" for b in range(6) for k in (2, 0, 1)]  # modulation, up, down: as called
    order = snapshot.order
    assert order == tuple(name for name in called if name not in snapshot.resident)
    assert "blocks.0[2]" in order or "blocks.1[2]" in order, "a modulation streams: the order is tested"
    assert snapshot.queued and snapshot.queued == order[:len(snapshot.queued)], \
        "the next step's first units are copied during this step's tail"
    before = engine.figures.streamed_bytes
    run(model, x, 2, engine)
    per_step = sum(engine.unit_bytes[i] for i in range(len(engine.units)) if engine.units[i].name in order)
    assert engine.figures.streamed_bytes - before == 2 * per_step, "no copy dropped on a wrong guess"


def test_the_first_streamed_units_are_copied_at_placement(model, x):
    engine = chunked(model, StreamConfig(plan_from_profile=False))
    plan = engine.attach(device(), engine.fixed_bytes + 3 * max(engine.unit_bytes))
    queued = engine.snapshot().queued
    assert queued and queued[0] == engine.units[min(set(range(len(engine.units))) - plan.resident)].name
    queued_bytes = sum(u.nbytes for u in engine.units if u.name in queued)
    assert queued_bytes <= plan.ring_bytes
    assert engine.figures.streamed_bytes == 0, "placement copies are not the run's"


def test_the_ring_holds_as_many_small_units_as_its_bytes_allow(model, x):
    engine = chunked(model, StreamConfig(plan_from_profile=False))
    plan = engine.attach(device(), engine.fixed_bytes + 3 * max(engine.unit_bytes), prefetch_depth=2)
    assert plan.slots == 3 and not plan.resident
    run(model, x, 2, engine)
    snapshot = engine.snapshot()
    held = [u.nbytes for u in engine.units if u.name in snapshot.queued]
    assert len(held) > plan.slots and sum(held) <= plan.ring_bytes, "extents, not slots of the largest unit"


def test_a_profiled_step_replaces_the_spread_plan_and_stays_exact(model, x):
    (expected,) = run(model, x, 1)
    engine = chunked(model)
    budget = engine.fixed_bytes + sum(engine.unit_bytes) // 2
    spread = engine.attach(dev := device(), budget)
    assert spread.predicted_seconds is None and not engine.snapshot().profiled
    assert all(torch.equal(out, expected) for out in run(model, x, 3, engine))
    (key,) = engine.snapshot().profiled
    assert key == ((4, 8),)
    profile = engine.profiles[key]
    assert profile.bandwidth == pytest.approx(BANDWIDTH)
    assert [engine.units[i].name for i in profile.order[:3]] == ["blocks.0[2]", "blocks.0[0]", "blocks.0[1]"], \
        "every unit in call order, resident ones included"
    planned = plan_for_profile(profile, budget)
    assert engine.attached.plan == planned != spread
    assert engine.figures.predicted_seconds == planned.predicted_seconds
    assert dev.peak_bytes <= budget and engine.held_bytes == planned.device_bytes(engine.unit_bytes)
    # A new activation shape is profiled again, and the output is still exact.
    x2 = torch.randn(2, 8)
    (streamed2,) = run(model, x2, 1, engine)
    assert set(engine.snapshot().profiled) == {key, ((2, 8),)}
    engine.detach()
    assert torch.equal(streamed2, run(model, x2, 1)[0])


class WarmingDevice(SimulatedDevice):
    """A device whose first step at a shape is a warm-up, as on CUDA (kernels run the first time)."""

    warmup_steps = 1


def test_a_device_with_a_warm_up_step_profiles_the_step_after_it(model, x):
    engine = chunked(model)
    budget = engine.fixed_bytes + sum(engine.unit_bytes) // 2
    spread = engine.attach(WarmingDevice(bandwidth=BANDWIDTH, compute=compute_seconds), budget)
    run(model, x, 1, engine)
    assert not engine.snapshot().profiled and engine.attached.plan == spread
    run(model, x, 1, engine)
    assert engine.snapshot().profiled == (((4, 8),),) and engine.attached.plan != spread


def test_the_virtual_clock_runs_the_simulated_schedule(model, x):
    """The engine's steady step on the virtual clock is the simulator's prediction for its plan."""
    engine = chunked(model)
    budget = engine.fixed_bytes + sum(engine.unit_bytes) // 3
    engine.attach(device(), budget)
    run(model, x, 2, engine)  # a profiled step, then one on the measured plan
    engine.begin_run()
    run(model, x, 3, engine)
    figures = engine.figures
    plan, profile = engine.attached.plan, engine.profiles[((4, 8),)]
    predicted = simulate(profile, plan.resident, plan.ring_bytes).step_seconds
    assert figures.step_seconds / 3 == pytest.approx(predicted, rel=0.02)
    assert figures.stall_seconds >= 0 and figures.copy_seconds == pytest.approx(
        3 * sum(engine.unit_bytes[i] for i in range(len(engine.units)) if i not in plan.resident) / BANDWIDTH)


def test_shapes_that_alternate_are_profiled_once_each_and_do_not_re_place_every_step(model, x):
    """A conditional and an unconditional call of different shapes alternate within a run."""
    engine = chunked(model)
    engine.attach(device(), engine.fixed_bytes + sum(engine.unit_bytes) // 2)
    x2 = torch.randn(2, 8)
    for _ in range(2):
        run(model, x, 1, engine)
        run(model, x2, 1, engine)
    placement = engine.attached
    for _ in range(2):
        run(model, x, 1, engine)
        run(model, x2, 1, engine)
    assert engine.attached is placement and len(engine.profiles) == 2


def test_a_timed_step_gives_its_timeline_and_keeps_the_plan(model, x):
    engine = chunked(model)
    engine.attach(device(), engine.fixed_bytes + sum(engine.unit_bytes) // 3)
    run(model, x, 2, engine)
    placement, profile = engine.attached, engine.profiles[((4, 8),)]
    engine.time_next_step()
    run(model, x, 1, engine)
    timeline = engine.timeline
    assert engine.attached is placement and engine.profiles[((4, 8),)] is profile, "a timeline is no new profile"
    assert [s.unit for s in timeline.compute] == list(profile.order), "one span per entry, in call order"
    streamed = [i for i in range(len(engine.units)) if i not in placement.plan.resident]
    assert sorted(s.unit for s in timeline.copies) == sorted(streamed), "each streamed unit copied once"
    assert all(c.end - c.start == pytest.approx(engine.unit_bytes[c.unit] / BANDWIDTH) for c in timeline.copies)
    spans = timeline.compute
    assert all(a.end <= b.start - b.stall + 1e-12 for a, b in zip(spans, spans[1:])), "compute is serial"


@pytest.mark.parametrize("share", [1 / 2, 1 / 3, 1 / 4])
def test_the_profiled_plan_runs_faster_than_the_spread_plan_on_the_virtual_clock(share, x):
    """Compute is not proportional to bytes here (the up-projections are dear): the measured
    plan keeps the cheap units resident and hides copies behind the dear ones."""
    steady = []
    for config in (StreamConfig(plan_from_profile=False), StreamConfig()):
        torch.manual_seed(0)
        model = Stack().eval()
        engine = chunked(model, config)
        engine.attach(device(), engine.fixed_bytes + int(share * sum(engine.unit_bytes)))
        run(model, x, 2, engine)
        engine.begin_run()
        run(model, x, 3, engine)
        steady.append(engine.figures.step_seconds / 3)
    spread, profiled = steady
    assert profiled < 0.95 * spread


def test_the_config_takes_the_environment_overrides_once_and_refuses_bad_values(monkeypatch):
    monkeypatch.setenv("STREAMLOADER_CHUNK_MB", "2")
    monkeypatch.setenv("STREAMLOADER_PREFETCH_DEPTH", "3")
    config = StreamConfig.from_env()
    assert config == StreamConfig(chunk_bytes=2 * 2**20, prefetch_depth=3)
    assert StreamConfig.from_env(prefetch_depth=None).prefetch_depth is None, "explicit overrides win"
    monkeypatch.setenv("STREAMLOADER_PREFETCH_DEPTH", "two")
    with pytest.raises(ValueError, match="STREAMLOADER_PREFETCH_DEPTH must be a whole number"):
        StreamConfig.from_env()
    with pytest.raises(ValueError, match="`chunk_bytes`"):
        StreamConfig(chunk_bytes=-1)


def test_a_fixed_prefetch_depth_keeps_the_spread_plan_and_profiles_nothing(model, x):
    engine = chunked(model, StreamConfig(prefetch_depth=1))
    plan = engine.attach(device(), engine.fixed_bytes + sum(engine.unit_bytes) // 2)
    run(model, x, 3, engine)
    assert engine.attached.plan == plan and plan.slots == 2 and not engine.profiles


def test_the_engine_counts_its_own_host_time_in_steps(model, x):
    """Wall-clock time in the hooks and step ends: what a host-bound step pays the engine."""
    import time

    engine = chunked(model)
    engine.attach(device(), engine.fixed_bytes + 3 * max(engine.unit_bytes))
    run(model, x, 1, engine)
    engine.begin_run()
    started = time.perf_counter()
    run(model, x, 3, engine)
    wall = time.perf_counter() - started
    figures = engine.figures
    assert figures.steps == 3 and 0 < figures.host_seconds < wall
    assert figures.as_dict()["host_seconds"] == figures.host_seconds


def test_a_placement_where_nothing_streams_hooks_no_layer(model, x):
    """Hooks cost every layer call; without a ring they would only learn an order nobody uses."""
    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    (expected,) = run(model, x, 1)
    engine = chunked(model)
    engine.attach(device(), None)
    assert hooks() == 0
    assert all(torch.equal(out, expected) for out in run(model, x, 2, engine))
    assert engine.figures.steps == 2
    engine.attach(device(), engine.fixed_bytes + 3 * max(engine.unit_bytes))
    assert hooks() > 0
