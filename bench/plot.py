"""A PNG of a stream_bench.json: time per forward against measured peak device memory.

Drawn with Pillow alone, so it runs wherever the benchmark runs (GPU machines without
matplotlib included):  python bench/plot.py results/stream_bench.json
"""
from __future__ import annotations

import json
import sys

from PIL import Image, ImageDraw

GIB = 1024**3
W, H, MARGIN = 900, 560, 70
COLORS = {"engine": (31, 119, 180), "comfy_lowvram": (255, 127, 14), "resident": (44, 160, 44),
          "bound": (120, 120, 120)}


def _series(result: dict) -> dict[str, list[tuple[float, float]]]:
    engine = result["engine"]
    series = {"engine": [(r["peak_bytes"] / GIB, r["ms"]) for r in engine],
              "resident": [(result["resident"]["peak_bytes"] / GIB, result["resident"]["ms"])]}
    if result.get("comfy_lowvram"):
        series["comfy_lowvram"] = [(r["peak_bytes"] / GIB, r["ms"]) for r in result["comfy_lowvram"]]
    if all(r.get("bound_ms") for r in engine):
        series["bound"] = [(r["peak_bytes"] / GIB, r["bound_ms"]) for r in engine]
    return {k: sorted(v) for k, v in series.items()}


def plot(result: dict, path: str) -> None:
    series = _series(result)
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x_max, y_max = max(xs) * 1.1 or 1.0, max(ys) * 1.1 or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return MARGIN + x / x_max * (W - 2 * MARGIN), H - MARGIN - y / y_max * (H - 2 * MARGIN)

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.line([at(0, 0), at(x_max, 0)], fill="black")
    draw.line([at(0, 0), at(0, y_max)], fill="black")
    for i in range(6):
        x, y = x_max * i / 5, y_max * i / 5
        draw.text((at(x, 0)[0] - 10, H - MARGIN + 8), f"{x:.2f}", fill="black")
        draw.text((8, at(0, y)[1] - 6), f"{y:.0f}", fill="black")
    draw.text((W // 2 - 90, H - 30), "peak device memory (GiB)", fill="black")
    draw.text((8, 20), "ms / forward", fill="black")
    title = f"{result['model']['size']} Flux, {result['device']}, {result['date']}"
    draw.text((W // 2 - 4 * len(title) // 1, 10), title, fill="black")
    for n, (name, pts) in enumerate(series.items()):
        color = COLORS[name]
        coords = [at(x, y) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)
        draw.rectangle([W - 230, 40 + 20 * n, W - 218, 52 + 20 * n], fill=color)
        draw.text((W - 210, 40 + 20 * n), name, fill="black")
    img.save(path)


def plot_timeline(result: dict, path: str) -> None:
    """One streamed step: a lane of copies above a lane of compute, one box per unit, stalls in red."""
    t = result["timeline"]
    spans = [*(c[1:3] for c in t["copies"]), *(c[1:3] for c in t["compute"])]
    t0, t1 = min(s[0] for s in spans), max(max(s[1] for s in spans), t["step_ms"])
    scale = (W - 2 * MARGIN) / ((t1 - t0) or 1.0)
    img = Image.new("RGB", (W, 300), "white")
    draw = ImageDraw.Draw(img)
    lanes = {"copies": (80, 130, COLORS["comfy_lowvram"]), "compute": (170, 220, COLORS["engine"])}
    for lane, (top, bottom, color) in lanes.items():
        draw.text((8, top + 18), lane, fill="black")
        for span in t[lane]:
            x0, x1 = MARGIN + (span[1] - t0) * scale, MARGIN + (span[2] - t0) * scale
            draw.rectangle([x0, top, max(x1, x0 + 1), bottom], fill=color, outline="white")
            if lane == "compute" and span[3] > 0:  # the compute stream waited for this unit's copy
                draw.rectangle([x0 - span[3] * scale, top, x0, bottom], fill=(214, 39, 40))
    for i in range(6):
        ms = t0 + (t1 - t0) * i / 5
        draw.text((MARGIN + (ms - t0) * scale - 10, 240), f"{ms:.3g}", fill="black")
    draw.text((W // 2 - 20, 265), "ms from the step's start", fill="black")
    title = (f"one step at {t['fraction']:.0%} resident: {t['step_ms']:.1f} ms, stalls (red) {t['stall_ms']:.1f} ms; "
             f"{result['device']}, {result['date']}")
    draw.text((MARGIN, 20), title, fill="black")
    img.save(path)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        data = json.load(f)
    plot(data, sys.argv[1].rsplit(".", 1)[0] + ".png")
    if data.get("timeline"):
        plot_timeline(data, sys.argv[1].rsplit("/", 1)[0] + "/stream_timeline.png")
