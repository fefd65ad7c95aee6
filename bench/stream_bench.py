"""Streamed steps against fully resident and ComfyUI's own lowvram path, at equal peak memory.

One command, on a GPU or on the CPU:

    python bench/stream_bench.py --comfy PATH_TO_COMFYUI [--out DIR]

The model is ComfyUI's own Flux class with random weights: Flux.1-sized (12B parameters,
19 double and 38 single blocks, bf16) on a GPU, a small one of the same family on the CPU.
In one run it measures:
- fully resident (the engine with no budget: every weight on the device);
- this engine with 0, 25, 50 and 75% of the blocks resident (plus the ring);
- on a GPU, ComfyUI 0.3.75's lowvram path (`ModelPatcher.load(lowvram_model_memory=...)`)
  at the same budgets, so the two are compared at equal measured peak device memory;
- the physical bound max(resident compute, streamed bytes / pinned host-to-device bandwidth);
- the plan's predicted step time and its ring bytes per row (the first forward is profiled and
  re-planned), a timeline of one streamed step (copies and compute per unit, stalls marked),
  and a compute-bound row: video-length tokens on a few blocks, everything streamed.
On the CPU the engine runs on the simulated device: the counters, the budget and exactness
are real, the times are CPU times, and ComfyUI's lowvram path (GPU only) is skipped.

Writes DIR/stream_bench.json, DIR/stream_bench.png and DIR/stream_timeline.png.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from functools import partial

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB, GIB = 1024**2, 1024**3
# Each row's budget is the fixed weights, its resident share and this many largest units for the
# ring. With two (the least a streamed step can run in) a Flux single block's 132 MB linear cannot
# be copied while the 150 MB before it are still held, so the copy engine idles through their
# compute: 1.09x the bound at 0% simulated, 1.100x measured on an H200. With four the planner
# predicts 1.01x at 0% and in the compute-bound row (tests/unit/test_streaming_planner.py).
RING_UNITS = 4.0

FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10_000, patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX_SMALL = {**FLUX_DEV, "vec_in_dim": 64, "context_in_dim": 64, "hidden_size": 256, "num_heads": 4,
              "depth": 4, "depth_single_blocks": 16, "axes_dim": [8, 28, 28]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".comfy"),
                   help="a ComfyUI checkout (0.3.75); default $COMFYUI_PATH or .comfy/")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "bench", "results"))
    p.add_argument("--size", choices=("flux", "small"), default=None,
                   help="flux (12B) on a GPU, small on the CPU by default")
    p.add_argument("--double", type=int, help="double blocks (fewer where memory is short)")
    p.add_argument("--single", type=int, help="single blocks")
    p.add_argument("--image-tokens", type=int, default=None, help="4096 (a 1024x1024 image) on a GPU")
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--fractions", default="0,0.25,0.5,0.75", help="shares of the blocks kept resident")
    p.add_argument("--depth", type=int, default=None, help="prefetch depth (default: the planner's)")
    p.add_argument("--ring-units", type=float, default=RING_UNITS,
                   help="each row's budget beyond its resident share, in largest units (default %(default)s)")
    p.add_argument("--chunk-mb", type=float, default=None,
                   help="blocks over twice this stream in chunks of about this size (0: whole blocks; default 64)")
    p.add_argument("--reps", type=int, default=5, help="timed forwards per variant (median)")
    p.add_argument("--timeline-fraction", type=float, default=0.5, help="the row whose step is drawn")
    p.add_argument("--video-tokens", type=int, default=None,
                   help="tokens of the compute-bound row (32,760 on a GPU; 0: no such row)")
    return p.parse_args()


def import_comfy(path: str, cpu: bool):
    sys.path.insert(0, os.path.abspath(path))
    sys.path.insert(1, REPO)
    from comfy.cli_args import args

    args.cpu = cpu
    import comfy.ldm.flux.model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    return comfy


class Bench:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.cuda = torch.cuda.is_available()
        self.comfy = import_comfy(opts.comfy, cpu=not self.cuda)
        from loader import StreamEngine, device_for, shapes_of
        from loader.device import SimulatedDevice

        self.shapes_of = shapes_of
        self.device = torch.device("cuda") if self.cuda else torch.device("cpu")
        self.stream_device = device_for(self.device) if self.cuda else SimulatedDevice()
        size = opts.size or ("flux" if self.cuda else "small")
        config = dict(FLUX_DEV if size == "flux" else FLUX_SMALL)
        config["depth"] = opts.double if opts.double is not None else config["depth"]
        config["depth_single_blocks"] = opts.single if opts.single is not None else config["depth_single_blocks"]
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.config, self.size = config, size
        self.model = self._build(config)
        self.inputs = self._inputs(config, opts.image_tokens or (4096 if size == "flux" else 256),
                                   opts.text_tokens or (512 if size == "flux" else 32))
        self.chunk = None if opts.chunk_mb is None else int(opts.chunk_mb * MIB)
        self.engine = StreamEngine(self.model, self.model, chunk_bytes=self.chunk)
        self.result = {
            "date": datetime.date.today().isoformat(), "device": self._device_name(), "torch": torch.__version__,
            "model": {"family": "flux", "size": size, "config": config, "dtype": str(self.dtype),
                      "parameters": sum(p.numel() for p in self.model.parameters()),
                      "unit_bytes": self.engine.unit_bytes, "units": len(self.engine.units),
                      "fixed_bytes": self.engine.fixed_bytes,
                      "image_tokens": self.inputs[0].shape[-1] * self.inputs[0].shape[-2] // 4,
                      "text_tokens": self.inputs[2].shape[1]},
            "ring_units": opts.ring_units,
        }

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(0) if self.cuda else "CPU (simulated device)"

    def _build(self, config: dict) -> torch.nn.Module:
        """ComfyUI's Flux on the host; weights filled by tiling one random pool (fast at 12B)."""
        model = self.comfy.ldm.flux.model.Flux(dtype=self.dtype, device="cpu",
                                               operations=self.comfy.ops.disable_weight_init, **config).eval()
        pool = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(self.dtype)
        with torch.no_grad():
            for p in model.parameters():
                flat = p.data.view(-1)
                for start in range(0, flat.numel(), pool.numel()):
                    n = min(pool.numel(), flat.numel() - start)
                    flat[start:start + n].copy_(pool[:n])
        return model

    def _inputs(self, config: dict, image_tokens: int, text_tokens: int):
        side = int(round(image_tokens ** 0.5)) * 2
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, config["in_channels"], side, side, generator=g)
        context = torch.randn(1, text_tokens, config["context_in_dim"], generator=g)
        y = torch.randn(1, config["vec_in_dim"], generator=g)
        t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
        return [v.to(self.device, self.dtype) for v in (x, t, context, y, guidance)]

    def forward(self) -> torch.Tensor:
        x, t, context, y, guidance = self.inputs
        with torch.inference_mode(), self.engine.step(self.shapes_of((x, t, context), {"y": y})):
            return self.model(x, t, context, y=y, guidance=guidance)

    def timed(self) -> tuple[float, torch.Tensor]:
        """Median seconds of a forward, and the output. Two warm-ups: the engine learns the order
        of its units in the first and starts the second from it; figures count from then on."""
        self.forward()
        out = self.forward()
        self.engine.begin_run()
        times = []
        for _ in range(self.opts.reps):
            self._sync()
            start = time.perf_counter()
            out = self.forward()
            self._sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2], out

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, place, release) -> dict:
        """Place the weights, time forwards, and measure the peak device memory of the whole run."""
        self._clean()
        base = torch.cuda.memory_allocated() if self.cuda else 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        place()
        seconds, out = self.timed()
        peak = (torch.cuda.max_memory_allocated() - base) if self.cuda else self.stream_device.peak_bytes
        out = out.float().cpu()
        row = {"ms": seconds * 1e3, "peak_bytes": int(peak), "finite": bool(torch.isfinite(out).all()), "output": out}
        release()
        return row

    def _clean(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self.stream_device.reset_peak()

    def bandwidth(self) -> float | None:
        """Pinned host-to-device bytes per second (median of 3 copies of 1 GiB)."""
        if not self.cuda:
            return None
        host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(GIB, dtype=torch.uint8, device=self.device)
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        del host, dev
        return GIB / sorted(times[1:])[1]

    def budget(self, fraction: float) -> int:
        e = self.engine
        return e.fixed_bytes + int(fraction * sum(e.unit_bytes)) + int(self.opts.ring_units * max(e.unit_bytes))

    def run(self) -> dict:
        opts, engine = self.opts, self.engine
        fractions = [float(f) for f in opts.fractions.split(",")]
        bw = self.bandwidth()
        self.result["pinned_h2d_bytes_per_s"] = bw
        resident = self.measure(lambda: engine.attach(self.stream_device, None), engine.detach)
        reference = resident.pop("output")
        self.result["resident"] = resident
        rows = []
        for fraction in fractions:
            budget = self.budget(fraction)
            row = self.measure(partial(engine.attach, self.stream_device, budget, opts.depth), lambda: None)
            figures = engine.figures
            per_step = figures.streamed_bytes / max(figures.steps, 1)
            if fraction == opts.timeline_fraction:
                self.result["timeline"] = self.timeline(fraction)
            engine.detach()
            bound = max(resident["ms"], per_step / bw * 1e3) if bw else None
            rows.append({"fraction": fraction, "budget_bytes": budget, "ms": row["ms"], "peak_bytes": row["peak_bytes"],
                         "pack_peak_bytes": figures.peak_device_bytes, "streamed_bytes_per_step": int(per_step),
                         "resident_units": figures.resident_units, "streamed_units": figures.streamed_units,
                         "copy_s_per_step": figures.copy_seconds / max(figures.steps, 1),
                         "stall_s_per_step": figures.stall_seconds / max(figures.steps, 1),
                         "bound_ms": bound, "x_bound": row["ms"] / bound if bound else None, "finite": row["finite"],
                         "predicted_ms": _ms(figures.predicted_seconds), "ring_bytes": figures.ring_bytes,
                         "max_abs_diff": (row["output"] - reference).abs().max().item()})
            print(json.dumps({k: v for k, v in rows[-1].items()}), flush=True)
        self.result["engine"] = rows
        engine.close()
        self.result["comfy_lowvram"] = self.comfy_lowvram(rows, reference) if self.cuda else None
        self.result["comparison"] = compare(rows, self.result["comfy_lowvram"])
        self.result["compute_bound"] = self.compute_bound(bw)
        return self.result

    def timeline(self, fraction: float) -> dict | None:
        """One more step of the row at ``fraction``, timed per unit: copies and compute in ms from
        its start (a copy issued during the step before starts below 0), stalls marked."""
        self.engine.time_next_step()
        self.forward()
        t, names = self.engine.timeline, [u.name for u in self.engine.units]
        if t is None:  # nothing streams at this budget
            return None
        return {"fraction": fraction, "step_ms": t.step_seconds * 1e3, "stall_ms": t.stall_seconds * 1e3,
                "copies": [[names[s.unit], s.start * 1e3, s.end * 1e3] for s in t.copies],
                "compute": [[names[s.unit], s.start * 1e3, s.end * 1e3, s.stall * 1e3] for s in t.compute]}

    def compute_bound(self, bw: float | None) -> dict | None:
        """Video-length tokens on a few blocks, every block streamed: the copies hide behind compute."""
        tokens = self.opts.video_tokens if self.opts.video_tokens is not None else (32_760 if self.cuda else 1024)
        if not tokens:
            return None
        from loader import StreamEngine

        config = {**self.config, "depth": 2, "depth_single_blocks": 4}
        text = 512 if self.size == "flux" else 32
        self.model, self.inputs = self._build(config), self._inputs(config, tokens - text, text)
        self.engine = engine = StreamEngine(self.model, self.model, chunk_bytes=self.chunk)
        resident = self.measure(lambda: engine.attach(self.stream_device, None), engine.detach)
        budget = self.budget(0.0)
        row = self.measure(partial(engine.attach, self.stream_device, budget), lambda: None)
        figures = engine.figures
        per_step = figures.streamed_bytes / max(figures.steps, 1)
        engine.close()
        bound = max(resident["ms"], per_step / bw * 1e3) if bw else None
        out = {"tokens": tokens, "blocks": len(engine.units), "budget_bytes": budget, "resident_ms": resident["ms"],
               "ms": row["ms"], "peak_bytes": row["peak_bytes"], "x_resident": row["ms"] / resident["ms"],
               "bound_ms": bound, "x_bound": row["ms"] / bound if bound else None,
               "predicted_ms": _ms(figures.predicted_seconds), "ring_bytes": figures.ring_bytes,
               "resident_units": figures.resident_units, "streamed_units": figures.streamed_units,
               "max_abs_diff": (row["output"] - resident["output"]).abs().max().item()}
        print(json.dumps({"compute_bound": out}), flush=True)
        return out

    def comfy_lowvram(self, rows: list[dict], reference: torch.Tensor) -> list[dict]:
        """ComfyUI's own partial load (its per-layer casts from pinned weights) at the engine's
        budgets and two larger ones: ComfyUI keeps cast buffers inside its budget, so its peaks
        sit below the engine's at equal budgets, and the larger ones bracket the engine's peaks."""
        budgets = [r["budget_bytes"] for r in rows]
        budgets += [int(max(budgets) * 1.25), int(max(budgets) * 1.5)]
        out = []
        for budget in budgets:
            patcher = self.comfy.model_patcher.ModelPatcher(self.model, load_device=self.device,
                                                            offload_device=torch.device("cpu"))
            row = self.measure(partial(patcher.load, self.device, lowvram_model_memory=budget),
                               partial(self._comfy_release, patcher))
            out.append({"budget_bytes": budget, "ms": row["ms"], "peak_bytes": row["peak_bytes"],
                        "finite": row["finite"], "max_abs_diff": (row["output"] - reference).abs().max().item()})
            print(json.dumps({"comfy_lowvram": out[-1]}), flush=True)
        return out

    def _comfy_release(self, patcher) -> None:
        """Unload, and put the weights back in the host slabs, so every row starts alike."""
        patcher.detach()
        self.engine.restore_host_views(lambda spec: True)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def compare(engine_rows: list[dict], comfy_rows: list[dict] | None) -> list[dict]:
    """The engine's time against ComfyUI's, interpolated at the engine's measured peak memory."""
    if not comfy_rows:
        return []
    points = sorted((c["peak_bytes"], c["ms"]) for c in comfy_rows)
    out = []
    for r in engine_rows:
        comfy_ms = _interpolate(points, r["peak_bytes"])
        out.append({"fraction": r["fraction"], "peak_bytes": r["peak_bytes"], "engine_ms": r["ms"],
                    "comfy_ms_at_equal_peak": comfy_ms,
                    "speedup": comfy_ms / r["ms"] if comfy_ms else None})
    return out


def _interpolate(points: list[tuple[int, float]], x: int) -> float | None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main() -> None:
    opts = parse_args()
    os.makedirs(opts.out, exist_ok=True)
    result = Bench(opts).run()
    path = os.path.join(opts.out, "stream_bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plot import plot, plot_timeline

    plot(result, os.path.join(opts.out, "stream_bench.png"))
    if result.get("timeline"):
        plot_timeline(result, os.path.join(opts.out, "stream_timeline.png"))
    print(f"wrote {path}, stream_bench.png" + (" and stream_timeline.png" if result.get("timeline") else ""))


if __name__ == "__main__":
    main()
