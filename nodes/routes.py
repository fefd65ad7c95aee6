"""HTTP routes, GET /streamloader/stats and POST /streamloader/release, and the prompt worker's
side of them; see the thread contract in loader/manager.py."""
from __future__ import annotations

import asyncio
import gc

import comfy.model_management
import torch
from aiohttp import web

from ..loader import get_manager

_FLAG = "streamloader_requests"
STATS_EVENT = "streamloader.stats"  # sent when the worker has published a new snapshot
_NUDGE_S = 0.05


def register(server) -> None:
    routes = server.routes
    apply_between_prompts(server)
    # A full collection of Python's cyclic garbage walks every object of the process: about
    # 235 ms for the 0.5 M objects of a ComfyUI server on the test machine, with the GIL held,
    # so the event loop stood still whenever a model build triggered one. The objects made at
    # start-up (modules, node classes, tokenizers) live as long as the process: out of the
    # collector's walk, a full collection takes a few ms.
    gc.freeze()

    @routes.get("/streamloader/stats")
    async def stats(request: web.Request) -> web.Response:
        manager = get_manager()
        return web.json_response({**manager.snapshot(), **manager.counters(), "peak_vram_bytes": _peak_vram()})

    @routes.post("/streamloader/peak/reset")
    async def reset_peak(request: web.Request) -> web.Response:
        device = _cuda_device()
        if device is not None:
            torch.cuda.reset_peak_memory_stats(device)
        return web.json_response({"peak_vram_bytes": _peak_vram()})

    @routes.post("/streamloader/release")
    async def release(request: web.Request) -> web.Response:
        running, _ = server.prompt_queue.get_current_queue_volatile()  # read first: the release follows them
        posted = get_manager().request_release()
        asyncio.ensure_future(_wake_until_applied(server.prompt_queue, posted.id))
        return web.json_response({"id": posted.id, "released": len(posted.models), "models": list(posted.models),
                                  "after_prompts": [item[1] for item in running]})


def _cuda_device() -> torch.device | None:
    device = comfy.model_management.get_torch_device()
    return device if device.type == "cuda" else None


def _peak_vram() -> int | None:
    """The process's peak of ``torch.cuda.max_memory_allocated`` since the last reset (None
    without CUDA). Allocations outside torch's allocator (DynamicVRAM's weights) are not in it.
    A read of the allocator's counters: the event loop may do it while the worker runs."""
    device = _cuda_device()
    return None if device is None else torch.cuda.max_memory_allocated(device)


async def _wake_until_applied(queue, request_id: int) -> None:
    """Post the flag until the worker has applied the request. A flag wakes the worker only while it
    waits in the queue: one posted while it runs core's /free or its gc pass would otherwise wait
    for the next prompt, or for the end of its 1000 s idle wait."""
    manager = get_manager()
    while manager.applied_through < request_id:
        queue.set_flag(_FLAG, request_id)
        await asyncio.sleep(_NUDGE_S)


def apply_between_prompts(server) -> None:
    """Apply the pack's requests on the prompt worker, in the call that reads core's flags, then
    tell the editor the snapshot changed (its run-end events come before this publish).

    The worker calls ``queue.get_flags()`` after every prompt and every wake-up; core's
    ``reset=True`` empties the flag dict, so the requests are applied in that same call.
    A release also raises core's ``free_memory`` flag: ComfyUI's node cache holds the loaders'
    outputs, and with them the released models, until it is emptied as core's /free does."""
    queue = server.prompt_queue
    core_get_flags = queue.get_flags

    def get_flags(reset=True):
        flags = core_get_flags(reset)
        if reset:
            flags.pop(_FLAG, None)
            if get_manager().apply_requests():
                flags["free_memory"] = True
            server.send_sync(STATS_EVENT, {}, None)
        return flags

    queue.get_flags = get_flags
