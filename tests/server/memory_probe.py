"""A custom node module with no nodes, copied into the load test's server: GET /streamloader_test/memory
tells where the server's resident memory is, for the load test's RSS figures.

- ``host_allocator``: torch's CUDA caching host allocator (``torch.cuda.host_memory_stats()``, the
  pinned blocks torch keeps for reuse), when CUDA is initialized and the call exists;
- ``cuda_allocated_bytes`` / ``cuda_reserved_bytes``: torch's device allocator (context only);
- ``malloc``: glibc's heap (``mallinfo2``): bytes in use (mmapped blocks included), free (resident or
  given back to the OS), mmapped.
"""
import ctypes
import ctypes.util

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
_HOST_KEYS = ("allocated_bytes.current", "active_bytes.current", "allocations.current", "num_host_alloc",
              "num_host_free")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc() -> dict | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):  # glibc before 2.33
        return None
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {"in_use_bytes": info.uordblks + info.hblkhd, "free_bytes": info.fordblks, "mmapped_bytes": info.hblkhd}


def _cuda() -> dict:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    out = {"cuda_allocated_bytes": torch.cuda.memory_allocated(), "cuda_reserved_bytes": torch.cuda.memory_reserved()}
    host_stats = getattr(torch.cuda, "host_memory_stats", None)  # torch 2.8 and newer
    if host_stats is not None:
        stats = host_stats()
        out["host_allocator"] = {key: stats[key] for key in _HOST_KEYS if key in stats}
    return out


@PromptServer.instance.routes.get("/streamloader_test/memory")
async def memory(request: web.Request) -> web.Response:
    return web.json_response({"malloc": _malloc(), **_cuda()})
