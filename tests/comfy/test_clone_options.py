"""Clones of one held model with their own options; the OOM retry bound to its own engine."""
import logging

import pytest
import torch

from comfy_helpers import budget_gb, engine_of, load_checkpoint, out_of_memory_once, sample

pytestmark = pytest.mark.comfy


def test_each_clone_places_the_shared_engine_with_its_own_options(comfy, manager, reference):
    pos, neg, latent, expected = reference
    load_checkpoint()
    engine = engine_of(manager)
    small, large = budget_gb(engine, 0.3), budget_gb(engine, 0.8)
    a = load_checkpoint(stream_layers=True, max_vram_gb=small).args[0]
    b = load_checkpoint(stream_layers=True, max_vram_gb=large).args[0]
    plain = load_checkpoint().args[0]
    assert 0 < a.stream_options.max_vram_bytes < b.stream_options.max_vram_bytes
    for model in [a, b, plain, a, b]:
        assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
        placed = engine.attached.plan.budget_bytes if engine.attached is not None else None
        own = model.stream_options.max_vram_bytes if model.stream_options.stream_layers else None
        assert placed == own, "a clone ran with another clone's options"


def test_the_oom_retry_is_bound_to_its_engine_not_found_through_the_manager(comfy, manager, reference, caplog):
    pos, neg, latent, expected = reference
    load_checkpoint()
    engine = engine_of(manager)
    model = load_checkpoint(stream_layers=True, max_vram_gb=budget_gb(engine, 0.8)).args[0]
    sample(comfy, model, pos, neg, latent)
    manager.release_all()  # POST /streamloader/release: ComfyUI's cache still holds the model and runs it
    with caplog.at_level(logging.WARNING), out_of_memory_once(engine) as failures:
        assert torch.equal(sample(comfy, model, pos, neg, latent), expected)
    # The log, not the figures: on a GPU `sample` runs twice, and the second run's figures start fresh.
    assert failures and any("retried once" in r.getMessage() for r in caplog.records)
