"""StreamConfig: how the engine streams, built and validated once at the node edge.

The environment overrides (``STREAMLOADER_CHUNK_MB``, ``STREAMLOADER_PREFETCH_DEPTH``) are read
here, in ``StreamConfig.from_env``, and nowhere else in the engine; the config is frozen and
passed down whole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .options import MIB, bytes_from_env

CHUNK_ENV = "STREAMLOADER_CHUNK_MB"
PREFETCH_ENV = "STREAMLOADER_PREFETCH_DEPTH"
DEFAULT_CHUNK_BYTES = 64 * MIB


@dataclass(frozen=True)
class StreamConfig:
    """
    Args:
        chunk_bytes: blocks over twice this size stream in chunks of about this size, so the
            ring's bytes buy lookahead instead of slack (0: whole blocks).
        prefetch_depth: units copied ahead of the one computing, in largest streamed units
            (None: the planner's ring; set, it fixes the ring and the spread plan is kept).
        plan_from_profile: after a step is profiled (per activation shape), re-plan the resident
            set and the ring from the measured costs.
        chunks_in_call_order: after the first streamed step, group split blocks' chunks in the
            order their layers were called, not the order they were registered in.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    prefetch_depth: int | None = None
    plan_from_profile: bool = True
    chunks_in_call_order: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 0:
            raise ValueError(f"`chunk_bytes` must be a whole number of bytes >= 0, not {self.chunk_bytes!r}")
        if self.prefetch_depth is not None and (not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0):
            raise ValueError(f"`prefetch_depth` must be None or a whole number >= 0, not {self.prefetch_depth!r}")

    @classmethod
    def from_env(cls, **overrides) -> "StreamConfig":
        """The defaults with the environment's overrides, then ``overrides``.

        Raises:
            ValueError: an environment variable is not a number (naming it and the value).
        """
        values = {"chunk_bytes": bytes_from_env(CHUNK_ENV, MIB, DEFAULT_CHUNK_BYTES)}
        depth = os.environ.get(PREFETCH_ENV)
        if depth:
            if not depth.isdigit():
                raise ValueError(f"{PREFETCH_ENV} must be a whole number of units, not {depth!r}")
            values["prefetch_depth"] = int(depth)
        return cls(**{**values, **overrides})
