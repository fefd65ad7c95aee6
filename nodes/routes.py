"""HTTP routes: GET /streamloader/stats and POST /streamloader/release."""
from __future__ import annotations

from aiohttp import web

from ..loader import get_manager


def register(server) -> None:
    routes = server.routes

    @routes.get("/streamloader/stats")
    async def stats(request: web.Request) -> web.Response:
        return web.json_response(get_manager().stats())

    @routes.post("/streamloader/release")
    async def release(request: web.Request) -> web.Response:
        return web.json_response({"released": get_manager().release_all()})
