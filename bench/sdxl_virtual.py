"""The end-to-end streamed rows without a GPU: the engine on ComfyUI's SDXL UNet, on the virtual clock.

    python bench/sdxl_virtual.py --comfy PATH_TO_COMFYUI [--budgets 2,3.5] [--out DIR]

What a streamed SDXL step at 1024x1024 (batch 2: CFG) should cost on a GPU, if nothing but the
schedule costs time. The UNet is ComfyUI's own class at SDXL's real sizes (bf16, 2.57 B
parameters, the engine's 64 MiB chunks). Each unit entry's compute comes from its layers' FLOPs
at 1024x1024 (counted on the meta device; the FLOPs between two units, attention, go to the
unit before), plus reading its weights once at HBM speed, calibrated so the resident step takes
``--resident-ms``; copies run at ``--bandwidth``. Two answers per budget:
- ``predicted_ms``: the planner's simulated schedule for that profile (what the engine re-plans to);
- ``virtual_ms``: the engine itself, forwards of the real UNet on the simulated device (whose
  clock charges each entry the profile's seconds and each copy bytes / bandwidth), after its
  first steps (spread plan, profile, re-plan). The forwards run on 8x8 latents of zeros: the
  clock, not the CPU, says how long they take.
A measured GPU step far above these is lost outside the schedule (host time, pageable copies).
The engine's first step groups its chunks in call
order (``--registration-order`` keeps them as registered, for comparison); ``entries`` counts the
unit entries a step makes, and ``profile`` the cost profile the rows ran on (the planner's unit
tests plan on it). Writes DIR/sdxl_virtual.json (DIR/sdxl_virtual_registration_order.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
HBM_BYTES_PER_S = 4.8e12  # an H200's: a unit's first entry reads its weights once


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), required=not os.environ.get("COMFYUI_PATH"))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--budgets", default="2,3.5", help="the streamed rows' budgets, GiB (bench/e2e_bench.py's)")
    p.add_argument("--resident-ms", type=float, default=105.0,
                   help="the resident step it calibrates to (the H200's pack, fully loaded: about 105 ms)")
    p.add_argument("--bandwidth", type=float, default=53.8e9, help="pinned host-to-device bytes/s (the H200's)")
    p.add_argument("--steps", type=int, default=8,
                   help="forwards per budget; the last one is reported (the first few re-plan and settle)")
    p.add_argument("--registration-order", action="store_true",
                   help="keep the chunks grouped in registration order (the engine regroups them in call order)")
    return p.parse_args()


def sdxl_unet(device: str):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import comfy.ops
    import make_sdxl  # noqa: E402  (imports ComfyUI with args.cpu set)
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**make_sdxl.SDXL_UNET, dtype=torch.bfloat16, device=device,
                     operations=comfy.ops.disable_weight_init).eval()


def flops_per_entry(owner_by_name: dict[str, str], model, inputs) -> list[tuple[str, float]]:
    """(unit name, FLOPs) of each entry of a unit in call order, from a forward of ``model`` (on
    the meta device) whose modules ``owner_by_name`` maps to their units."""
    from torch.utils.flop_counter import FlopCounterMode

    owner = {id(m): owner_by_name[n] for n, m in model.named_modules() if n in owner_by_name}
    counter, state, entries = FlopCounterMode(display=False), {"mark": 0, "unit": None}, []

    def credit(unit, flops):
        if unit is None:
            return  # compute outside the units (embeddings, the output layer)
        if entries and entries[-1][0] == unit:
            entries[-1][1] += flops
        else:
            entries.append([unit, flops])

    def advance(module, *_):
        """Credit the FLOPs since the last hook to the unit entered, as the engine's timing does:
        a unit's entry lasts until another unit is entered (resident layers between count)."""
        total = counter.get_total_flops()
        credit(state["unit"], total - state["mark"])
        state["mark"] = total

    def enter(module, *_):
        advance(module)
        state["unit"] = owner.get(id(module), state["unit"])

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(advance))]
    try:
        with counter, torch.no_grad():
            model(*inputs[:2], context=inputs[2], y=inputs[3])
        credit(state["unit"], counter.get_total_flops() - state["mark"])
    finally:
        for h in handles:
            h.remove()
    return [(u, f) for u, f in entries]


def profile_seconds(entries, unit_bytes: dict[str, int], resident_s: float) -> list[tuple[str, float]]:
    """Seconds per entry: FLOPs at the rate that makes the resident step ``resident_s``, plus the
    first entry's weight read."""
    def seconds(rate):
        seen, out = set(), []
        for unit, flops in entries:
            out.append((unit, flops / rate + (unit_bytes[unit] / HBM_BYTES_PER_S if unit not in seen else 0.0)))
            seen.add(unit)
        return out

    lo, hi = 1e11, 1e17
    for _ in range(100):  # bisection on the FLOP rate
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if sum(s for _, s in seconds(mid)) > resident_s else (lo, mid)
    return seconds(lo)


def main() -> None:
    opts = parse_args()
    sys.path.insert(0, os.path.abspath(opts.comfy))
    sys.path.insert(1, REPO)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.modules.attention as attention

    from loader import StreamConfig, StreamEngine, shapes_of
    from loader.device import SimulatedDevice
    from loader.planner import plan_for_profile
    from loader.profile import Profile

    attention.optimized_attention = attention.attention_pytorch  # scaled_dot_product_attention: counted
    meta = sdxl_unet("meta")
    big = [torch.empty(s, device="meta", dtype=torch.bfloat16) for s in ((2, 4, 128, 128), (2,), (2, 77, 2048), (2, 2816))]
    model = sdxl_unet("cpu")  # torch.empty: pages untouched, and the engine copies nothing it was told is unread
    config = StreamConfig(chunks_in_call_order=not opts.registration_order)
    engine = StreamEngine(model, model, frozenset(id(p) for p in model.parameters()), config=config)
    small = [torch.zeros(s, dtype=torch.bfloat16) for s in ((2, 4, 8, 8), (2,), (2, 77, 2048), (2, 2816))]
    key = shapes_of(small[:2], {"context": small[2], "y": small[3]})
    # The engine's first streamed step groups the chunks in call order: the units to profile.
    engine.attach(SimulatedDevice(), int(float(opts.budgets.split(",")[0]) * GIB))
    with torch.inference_mode(), engine.step(key):
        model(*small[:2], context=small[2], y=small[3])
    engine.detach()
    names = {id(m): n for n, m in model.named_modules()}
    owners = {names[id(m)]: u.name for u in engine.units for m in u.weight_modules()}
    sizes = {u.name: u.nbytes for u in engine.units}
    entries = profile_seconds(flops_per_entry(owners, meta, big), sizes, opts.resident_ms / 1e3)
    index = {u.name: i for i, u in enumerate(engine.units)}
    profile = Profile(tuple(u.nbytes for u in engine.units), tuple(index[u] for u, _ in entries),
                      tuple(s for _, s in entries), opts.bandwidth, engine.fixed_bytes)
    per_unit: dict[str, list[float]] = {}
    for unit, seconds in entries:
        per_unit.setdefault(unit, []).append(seconds)
    calls: dict[str, int] = {}

    def compute(name: str, nbytes: int) -> float:
        k = calls[name] = calls.get(name, -1) + 1
        return per_unit[name][k % len(per_unit[name])]

    rows = []
    for budget_gib in [float(b) for b in opts.budgets.split(",")]:
        budget = int(budget_gib * GIB)
        plan = plan_for_profile(profile, budget)
        calls.clear()
        engine.attach(SimulatedDevice(bandwidth=opts.bandwidth, compute=compute), budget)
        for step in range(opts.steps):
            if step == 1 and any(calls.get(u, -1) + 1 != len(s) for u, s in per_unit.items()):
                raise RuntimeError("the engine entered the units another number of times than the FLOP trace")
            before = engine.figures
            marks = (before.step_seconds, before.stall_seconds, before.streamed_bytes)
            with torch.inference_mode(), engine.step(key):
                model(*small[:2], context=small[2], y=small[3])
        after = engine.figures
        engine.detach()
        streamed = after.streamed_bytes - marks[2]
        rows.append({"budget_gb": budget_gib, "predicted_ms": plan.predicted_seconds * 1e3,
                     "virtual_ms": (after.step_seconds - marks[0]) * 1e3, "stall_ms": (after.stall_seconds - marks[1]) * 1e3,
                     "streamed_bytes_per_step": streamed, "copy_ms": streamed / opts.bandwidth * 1e3,
                     "resident_units": after.resident_units, "streamed_units": after.streamed_units,
                     "ring_bytes": after.ring_bytes})
        print(json.dumps(rows[-1]), flush=True)
    out = {"model": "SDXL UNet (ComfyUI's UNetModel, bf16)", "chunks": "registration order" if
           opts.registration_order else "call order", "units": len(engine.units),
           "unit_bytes": sum(sizes.values()), "fixed_bytes": engine.fixed_bytes, "entries": len(entries),
           "resident_ms": opts.resident_ms, "bandwidth": opts.bandwidth, "rows": rows,
           "profile": {"unit_bytes": profile.unit_bytes, "order": profile.order, "entry_seconds": profile.entry_seconds,
                       "bandwidth": profile.bandwidth, "fixed_bytes": profile.fixed_bytes}}
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "sdxl_virtual_registration_order.json" if opts.registration_order else
                        "sdxl_virtual.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
