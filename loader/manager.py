"""The ModelManager: one per process, holding models warm across graph executions.

Models are keyed by the file's identity (real path, size, mtime, inode) and by the options
that change the bytes held (dtype). Two loader nodes naming one file share one entry; a
file changed on disk gets a new key and is read again. Entries are evicted least recently
used first when the host-RAM budget is exceeded. The manager counts every byte read from
disk and copied host-to-device, for the stats route and the nodes' figures.

Thread contract. ComfyUI runs one prompt worker thread beside its aiohttp event loop.
Engines, placements and the manager's entries are touched only by the prompt worker (the
thread that builds them; ``loader/threads.py`` checks it in tests). The event loop only reads
the immutable snapshot the worker publishes (``snapshot()``: at each load, at a streamed
run's start and each step's end (there only the streaming figures and byte counters are
renewed), after each prompt and at each release) and posts requests
(``request_release()``), which the worker applies between prompts (``apply_requests()``), as
core applies ``/free``.
A request answers at once with what it will release; one that arrives mid-run leaves that run
untouched and is applied when it ends. The worker picks requests up where core reads its
``/free`` flags: nodes/routes.py wraps the queue's ``get_flags``, which the worker calls after
every prompt and every wake-up, and applies requests in that call (core's ``reset=True`` empties
the whole flag dict, so a flag of the pack's own in core's dict would be lost). The worker's
idle wait is 1000 s in 0.3.75 and upstream (it does not wake every second), and
``PromptQueue.set_flag`` wakes it only while it waits, so the route posts its flag every 50 ms
until the request is applied.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .device import copied_bytes as device_copied_bytes
from .device import pinned_report
from .options import GIB, LoadOptions, bytes_from_env
from .params import ParamStore
from .safetensors_file import FileIdentity, ModelFileError, ReadCounter, SafetensorsFile

log = logging.getLogger(__name__)

_DEFAULT_RAM_SHARE = 0.5
_RELEASE_LOG = 256  # applied releases listed in the snapshot, newest last


@dataclass(frozen=True)
class ModelKey:
    identity: FileIdentity
    kind: str
    options_key: tuple


@dataclass
class ModelEntry:
    """A model held by the manager: its params store and what the builder made of it."""

    key: ModelKey
    store: ParamStore
    value: Any = None
    budget_bytes: int | None = None
    device_bytes: Callable[[], int] = lambda: 0
    on_evict: list[Callable[[], None]] = field(default_factory=list)
    engine: Any = None  # the StreamEngine of the diffusion model, when it has blocks to stream

    @property
    def path(self) -> str:
        return self.key.identity.path

    @property
    def host_bytes(self) -> int:
        return self.store.bound_bytes

    def describe(self) -> dict:
        return {
            "path": self.path,
            "kind": self.key.kind,
            "bytes": self.store.file.header.data_bytes,
            "host_resident_bytes": self.store.loaded_host_bytes,
            "vram_resident_bytes": int(self.device_bytes()),
            "budget_bytes": self.budget_bytes,
            "stream": self.engine.figures.as_dict() if self.engine is not None else None,
        }


@dataclass(frozen=True)
class ReleaseRequest:
    """A request, from any thread, to drop every held model between prompts."""

    id: int
    models: tuple[str, ...]  # the paths held at the last snapshot: what it will release
    requested_at: float  # time.time()


class ModelManager:
    """Process-wide cache of loaded models under a host-RAM budget (LRU eviction)."""

    def __init__(self, ram_budget_bytes: int | None = None):
        self.ram_budget_bytes = ram_budget_bytes if ram_budget_bytes is not None else _default_ram_budget()
        self.read_counter = ReadCounter()
        self.h2d_bytes = 0
        self.evictions = 0
        self.reloads = 0
        self._entries: OrderedDict[ModelKey, ModelEntry] = OrderedDict()
        self._lock = threading.RLock()
        self._requests_lock = threading.Lock()  # never held across a build: the event loop takes it
        self._release_count = 0
        self.applied_through = 0  # the id of the last release applied (read from any thread)
        self._pending: list[ReleaseRequest] = []
        self._applied: deque[dict] = deque(maxlen=_RELEASE_LOG)
        self._snapshot: dict = {}
        self.publish()

    @property
    def disk_bytes_read(self) -> int:
        return self.read_counter.bytes_read

    def get_or_load(self, path: str, kind: str, options: LoadOptions,
                    build: Callable[[ModelEntry], Any],
                    progress: Callable[[int, int], None] | None = None,
                    notes: list[str] | None = None) -> ModelEntry:
        """Return the held entry for ``path``, building it from a new params store if needed.

        Args:
            kind: what is built from the file ("checkpoint", "diffusion_model", "vae").
            build: turns the new entry (its params store) into the held value (ComfyUI objects).
            progress: eager loads report ``progress(done_bytes, total_bytes)``.
            notes: receives what the loader node should tell the user (an eager load that fell back).
        """
        key = ModelKey(FileIdentity.of(path), kind, options.cache_key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._load(key, build)
            else:
                self._entries.move_to_end(key)
        self.publish()
        if options.eager_load:
            self._load_eagerly(entry, progress, notes if notes is not None else [])
            self.publish()
        return entry

    def _load_eagerly(self, entry: ModelEntry, progress, notes: list[str]) -> None:
        """Read the whole file now, unless it does not fit the RAM left: then say so and stay lazy."""
        pending, available = entry.store.pending_bytes, self.available_host_bytes()
        if pending > available:
            note = (f"`eager_load` fell back to lazy reads: {pending / GIB:.2f} GiB are still to read but only "
                    f"{max(available, 0) / GIB:.2f} GiB of RAM is available (the lower of free RAM and the "
                    "StreamLoader RAM budget left); each part is read when first used. Free RAM or raise "
                    "STREAMLOADER_RAM_BUDGET_GB to load eagerly.")
            log.warning("StreamLoader: %s: %s", entry.path, note)
            notes.append(note)
            return
        entry.store.load_all(progress)

    def available_host_bytes(self) -> int:
        """RAM an eager read may fill: the lower of MemAvailable and the budget minus what is resident."""
        resident = sum(e.store.loaded_host_bytes for e in self.entries())
        left = self.ram_budget_bytes - resident
        free = _mem_available()
        return left if free is None else min(left, free)

    def _load(self, key: ModelKey, build: Callable[[ModelEntry], Any]) -> ModelEntry:
        self._drop_stale_versions(key)
        store = ParamStore(SafetensorsFile(key.identity.path, self.read_counter))
        entry = ModelEntry(key, store)
        try:
            entry.value = build(entry)
        except ModelFileError:
            raise
        except Exception as e:
            fault = store.refused or _architecture_mismatch(key.identity.path, e)
            if fault is None:
                raise
            raise fault from e
        self._entries[key] = entry
        log.info("StreamLoader: holding %s (%s, %.2f GiB)", key.identity.path, key.kind, entry.host_bytes / GIB)
        self._evict_to_budget(keep=key)
        return entry

    def _drop_stale_versions(self, key: ModelKey) -> None:
        for old in [k for k in self._entries if k.identity.path == key.identity.path and k.identity != key.identity]:
            log.info("StreamLoader: %s changed on disk; reading it again", old.identity.path)
            self.reloads += 1
            self._evict(old)

    def _evict_to_budget(self, keep: ModelKey) -> None:
        while self.held_host_bytes() > self.ram_budget_bytes:
            victim = next((k for k in self._entries if k != keep), None)
            if victim is None:
                return
            log.info("StreamLoader: evicting %s to stay within the RAM budget", victim.identity.path)
            self.evictions += 1
            self._evict(victim)

    def _evict(self, key: ModelKey) -> None:
        entry = self._entries.pop(key)
        for callback in entry.on_evict:
            callback()

    def held_host_bytes(self) -> int:
        return sum(e.host_bytes for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def total_h2d_bytes(self) -> int:
        """Host-to-device bytes: ComfyUI's placements of our models plus the engine's copies."""
        return self.h2d_bytes + device_copied_bytes()

    def record_h2d(self, nbytes: int) -> None:
        with self._lock:
            self.h2d_bytes += nbytes

    def release_all(self) -> int:
        """Drop every held model (on the owning thread); returns how many were dropped."""
        return len(self._release_all())

    def _release_all(self) -> list[str]:
        with self._lock:
            keys = list(self._entries)
            for key in keys:
                self._evict(key)
        return [key.identity.path for key in keys]

    def request_release(self) -> ReleaseRequest:
        """From any thread: ask the worker to drop every held model at its next stop between prompts."""
        with self._requests_lock:
            self._release_count += 1
            request = ReleaseRequest(self._release_count, tuple(m["path"] for m in self._snapshot["models"]),
                                     time.time())
            self._pending.append(request)
        return request

    def apply_requests(self) -> int:
        """On the worker, between prompts: apply the pending releases, then publish a snapshot.
        Returns how many releases were applied."""
        with self._requests_lock:
            pending, self._pending = self._pending, []
        for request in pending:
            released = self._release_all()
            if released:  # models sit in reference cycles: free them now, not at the next collection
                gc.collect()  # which returns the freed heap to the OS (_trim_after_full_collections)
            log.info("StreamLoader: release %d dropped %d models", request.id, len(released))
            self._applied.append({"id": request.id, "requested_at": request.requested_at,
                                  "applied_at": time.time(), "released": released})
            self.applied_through = request.id
        self.publish()
        return len(pending)

    def publish(self) -> None:
        """On the worker: replace the snapshot the event loop serves (built whole, never changed after)."""
        snapshot = self.stats()
        with self._requests_lock:
            snapshot["releases"] = {"requested": self._release_count, "applied": list(self._applied)}
        self._snapshot = snapshot

    def publish_step(self, engine: Any) -> None:
        """On the worker, at a streamed step's end: the last snapshot with ``engine``'s figures and
        the byte counters renewed. A whole snapshot walks every parameter of every held model
        (5-20 ms for an SDXL checkpoint on the test CPU, host time inside the sampling loop); the
        rest of it changes at loads, re-plans and releases, which publish whole."""
        mine = next((e for e in self.entries() if e.engine is engine), None)
        models = self._snapshot.get("models", [])
        where = None if mine is None else (mine.path, mine.key.kind)
        if where is None or where not in [(m["path"], m["kind"]) for m in models]:
            self.publish()
            return
        stream = engine.figures.as_dict()
        self._snapshot = {**self._snapshot, **self.counters(),
                          "models": [{**m, "stream": stream} if (m["path"], m["kind"]) == where else m for m in models]}

    def snapshot(self) -> dict:
        """From any thread: the last published stats, without waiting on any lock. Read only."""
        return self._snapshot

    def counters(self) -> dict:
        """From any thread: the byte counters as they are now (they grow during a run, between snapshots)."""
        return {"disk_bytes_read": self.disk_bytes_read, "h2d_bytes": self.total_h2d_bytes}

    def stats(self) -> dict:
        entries = self.entries()
        return {
            "disk_bytes_read": self.disk_bytes_read,
            "h2d_bytes": self.total_h2d_bytes,
            **pinned_report(),
            "ram_budget_bytes": self.ram_budget_bytes,
            "held_host_bytes": sum(e.host_bytes for e in entries),
            "evictions": self.evictions,
            "reloads": self.reloads,
            "models": [e.describe() for e in entries],
        }


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


def _architecture_mismatch(path: str, error: Exception) -> ModelFileError | None:
    """Torch's load_state_dict error for a tensor whose shape does not fit the model ComfyUI
    detected, as a ModelFileError that names the file; None for any other error."""
    match = _SIZE_MISMATCH.search(str(error))
    if match is None:
        return None
    name, in_file, in_model = match.groups()
    return ModelFileError(
        path, f"tensor `{name}` has shape {in_file} in the file but the architecture ComfyUI detected needs "
        f"{in_model}; the file does not match its architecture (a bad export or a mislabelled model)",
        "Re-export or re-download the file, or pick one made for this model.")


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _default_ram_budget() -> int:
    share = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _DEFAULT_RAM_SHARE)
    return bytes_from_env("STREAMLOADER_RAM_BUDGET_GB", GIB, share)


_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The process-wide manager; nodes never construct their own."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ModelManager()
            gc.callbacks.append(_trim_after_full_collections)
        return _manager


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _glibc_malloc_trim()


def _trim_after_full_collections(phase: str, info: dict) -> None:
    """A gc callback: after each full collection, give the heap pages it freed back to the OS.

    A dropped model sits in reference cycles, so a full collection is what frees it: the pack's
    release runs one, and so does ComfyUI's worker after ``/free`` (its cache of node outputs
    holds the loaders' models, also after a release). glibc keeps freed heap pages otherwise:
    the load test's streamed phase ended 141 MiB above its start RSS with no model object alive,
    4 MiB after a trim. A trim takes 0.5-2 ms in a server holding 1.3 GiB."""
    if phase == "stop" and info["generation"] == 2 and _malloc_trim is not None:
        _malloc_trim(0)
