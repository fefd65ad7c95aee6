"""HTTP routes, GET /streamloader/stats and POST /streamloader/release, and the prompt worker's
side of them; see the thread contract in loader/manager.py."""
from __future__ import annotations

from aiohttp import web

from ..loader import get_manager

_FLAG = "streamloader_requests"


def register(server) -> None:
    routes = server.routes
    apply_between_prompts(server.prompt_queue)

    @routes.get("/streamloader/stats")
    async def stats(request: web.Request) -> web.Response:
        manager = get_manager()
        return web.json_response({**manager.snapshot(), **manager.counters()})

    @routes.post("/streamloader/release")
    async def release(request: web.Request) -> web.Response:
        running, _ = server.prompt_queue.get_current_queue_volatile()  # read first: the release follows them
        posted = get_manager().request_release()
        server.prompt_queue.set_flag(_FLAG, posted.id)  # wakes an idle worker
        return web.json_response({"id": posted.id, "released": len(posted.models), "models": list(posted.models),
                                  "after_prompts": [item[1] for item in running]})


def apply_between_prompts(queue) -> None:
    """Apply the pack's requests on the prompt worker, in the call that reads core's flags.

    The worker calls ``queue.get_flags()`` after every prompt and every wake-up; core's
    ``reset=True`` empties the flag dict, so the requests are applied in that same call."""
    core_get_flags = queue.get_flags

    def get_flags(reset=True):
        flags = core_get_flags(reset)
        if reset:
            flags.pop(_FLAG, None)
            get_manager().apply_requests()
        return flags

    queue.get_flags = get_flags
