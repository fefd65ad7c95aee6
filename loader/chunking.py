"""A model's streaming units: each block whole, or in chunks grouped in the order its layers run.

At build time a block over twice the chunk size is cut in the order it registered its layers
(``split_block``); the engine's first streamed step records the order they ran in
(``order.ModuleCalls``), and ``regroupings`` names the blocks whose chunks that order groups
otherwise. ``regroup_block`` packs one such block again, in place in the unit list, so host
memory grows by one block at most.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blocks import discover_blocks
from .packing import Unit, repack, split_block


@dataclass(frozen=True)
class Regrouping:
    """Block ``name``'s chunks, grouped in call order."""

    name: str
    block: nn.Module
    chunks: list[list[nn.Module]]


def pack_units(blocks_root: nn.Module, chunk_bytes: int,
               pending: frozenset[int]) -> tuple[list[Unit], list[tuple[str, nn.Module]]]:
    """The units of ``blocks_root``'s blocks, packed in registration order, and the blocks in chunks."""
    units, split = [], []
    for name, block in discover_blocks(blocks_root):
        chunks = split_block(block, chunk_bytes)
        if len(chunks) > 1:
            split.append((name, block))
        units += [Unit(f"{name}[{k}]" if len(chunks) > 1 else name, block, modules, pending)
                  for k, modules in enumerate(chunks)]
    return units, split


def regroupings(units: list[Unit], split: list[tuple[str, nn.Module]], chunk_bytes: int,
                first_call: dict[int, int]) -> list[Regrouping]:
    """The blocks of ``split`` whose chunks ``first_call`` (each module's first call, by id) groups
    otherwise than ``units`` do."""
    out = []
    for name, block in split:
        chunks = split_block(block, chunk_bytes, first_call)
        if {frozenset(map(id, c)) for c in chunks} != {frozenset(map(id, u.modules)) for u in units if u.module is block}:
            out.append(Regrouping(name, block, chunks))
    return out


def regroup_block(units: list[Unit], regrouping: Regrouping) -> None:
    """Replace the block's units in ``units`` (in place) by its chunks packed again; the old slabs
    are unpinned and, once nothing else holds them, freed."""
    at = [i for i, u in enumerate(units) if u.module is regrouping.block]
    old = units[at[0]:at[-1] + 1]
    units[at[0]:at[-1] + 1] = repack(regrouping.name, old, regrouping.chunks)
    for unit in old:
        unit.unpin()


def entered_units(units: list[Unit], calls: list[nn.Module]) -> list[int]:
    """The units ``calls`` (modules, in call order) entered, one entry per entering."""
    unit_of = {id(m): i for i, u in enumerate(units) for m in u.weight_modules()}
    entered = [unit_of[id(m)] for m in calls]
    return [i for k, i in enumerate(entered) if k == 0 or entered[k - 1] != i]
