"""Sampler and VAE nodes: core's own sampling and VAE code, plus this run's figures on the node.

They delegate to the core nodes' functions so that outputs equal core's exactly; what they
add is the measurement: bytes read from disk, bytes copied host-to-device and seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import comfy.samplers
import nodes as comfy_nodes
from comfy_api.v0_0_2 import io

from ..loader import get_manager

_MIB = 1024**2


@dataclass(frozen=True)
class RunFigures:
    disk_bytes: int
    h2d_bytes: int
    seconds: float

    def as_text(self) -> str:
        return (f"disk read: {self.disk_bytes / _MIB:.1f} MiB | host-to-device: {self.h2d_bytes / _MIB:.1f} MiB "
                f"| {self.seconds:.2f} s")


def measured(fn, *args, **kwargs):
    """Run ``fn`` and return (its result, the figures of that run)."""
    manager = get_manager()
    disk0, h2d0, t0 = manager.disk_bytes_read, manager.total_h2d_bytes, time.perf_counter()
    result = fn(*args, **kwargs)
    figures = RunFigures(manager.disk_bytes_read - disk0, manager.total_h2d_bytes - h2d0, time.perf_counter() - t0)
    return result, figures


def figures_ui(lines: list[str], notes: list[str]) -> dict:
    """A node's ``ui``: every line under ``text``; the notes again under ``notes``, which the
    graph editor's extension shows in a warning colour."""
    return {"text": [*lines, *notes], "notes": list(notes)}


def _streamed_figures(model):
    engine = getattr(model, "stream_engine", None)
    if engine is None or engine.attached is None or not engine.figures.steps:
        return None
    return engine.figures


def stream_notes(model) -> list[str]:
    """What went differently in this run's streaming (an OOM retry, units left unpinned)."""
    f = _streamed_figures(model)
    return [] if f is None else list(f.notes)


def stream_lines(model) -> list[str]:
    """What streaming cost in this run, when the model streamed."""
    f = _streamed_figures(model)
    if f is None:
        return []
    efficiency = f"{f.overlap_efficiency:.0%}" if f.overlap_efficiency is not None else "n/a (no overlap on this device)"
    budget = "no cap" if f.budget_bytes is None else f"{f.budget_bytes / _MIB:.1f} MiB"
    pageable = f" ({f.pageable_bytes / _MIB:.1f} MiB from memory not page-locked)" if f.pageable_bytes else ""
    return [f"streamed ({f.device} device): {f.streamed_bytes / _MIB:.1f} MiB{pageable} over {f.steps} steps, "
            f"{f.resident_units} units resident, {f.streamed_units} streamed through a ring of {f.slots}",
            f"copies {f.copy_seconds:.3f} s, compute stalled {f.stall_seconds:.3f} s, "
            f"overlap efficiency {efficiency}, engine host time {f.host_seconds:.3f} s | "
            f"device peak {f.peak_device_bytes / _MIB:.1f} MiB of {budget}"]


class StreamLoaderKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamLoaderKSampler", display_name="KSampler (Stream)", category="sampling/stream",
            description="Core KSampler that shows what this run cost: bytes read from disk, host-to-device bytes, seconds.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0) -> io.NodeOutput:
        (latent,), figures = measured(comfy_nodes.common_ksampler, model, seed, steps, cfg, sampler_name,
                                      scheduler, positive, negative, latent_image, denoise=denoise)
        return io.NodeOutput(latent, ui=figures_ui([figures.as_text(), *stream_lines(model)], stream_notes(model)))


class StreamLoaderVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamLoaderVAEDecode", display_name="VAE Decode (Stream)", category="latent/stream",
            inputs=[io.Latent.Input("samples"), io.Vae.Input("vae")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        (images,), figures = measured(comfy_nodes.VAEDecode().decode, vae, samples)
        return io.NodeOutput(images, ui=figures_ui([figures.as_text()], []))


class StreamLoaderVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamLoaderVAEEncode", display_name="VAE Encode (Stream)", category="latent/stream",
            inputs=[io.Image.Input("pixels"), io.Vae.Input("vae")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, pixels, vae) -> io.NodeOutput:
        (latent,), figures = measured(comfy_nodes.VAEEncode().encode, vae, pixels)
        return io.NodeOutput(latent, ui=figures_ui([figures.as_text()], []))
