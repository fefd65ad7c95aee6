"""stream_layers on a real ComfyUI server (the simulated device without a GPU): its budget, interrupts."""
import time

import pytest

from server_helpers import (SAMPLER_NODE, failed_run, image_digest, reset, rerun, run_digest, sd15_prompt, stats,
                            ui_text)

pytestmark = pytest.mark.server

GIB = 1024**3
# The tiny SD1.5 UNet holds 8 MiB outside its blocks and 92 MiB in 5 blocks (the largest 27 MiB):
# 0.06 GiB fits the fixed weights, a ring of two slots and only the smallest blocks.
BUDGET_GB = 0.06


def streamed(budget_gb: float = BUDGET_GB, steps: int = 4) -> dict:
    prompt = sd15_prompt(stream_layers=True, max_vram_gb=budget_gb)
    prompt[SAMPLER_NODE]["inputs"]["steps"] = steps
    return prompt


def stream_stats(server) -> dict:
    (model,) = stats(server)["models"]
    return model["stream"]


@pytest.fixture
def reference(server) -> str:
    """The pixels of the example workflow with every weight resident (stream_layers off)."""
    reset(server)
    return run_digest(server, sd15_prompt())


def test_streamed_runs_equal_resident_within_the_budget(server, reference, comfy_device):
    record = rerun(server, streamed())
    assert image_digest(server, record) == reference
    figures = stream_stats(server)
    assert figures["streamed_units"] >= 3 and figures["streamed_units"] + figures["resident_units"] == 5
    assert figures["streamed_bytes"] > 0 and figures["steps"] >= 4
    assert figures["peak_device_bytes"] <= figures["budget_bytes"] == round(BUDGET_GB * GIB)
    kind = "cuda" if comfy_device == "cuda" else "simulated"
    assert any(line.startswith(f"streamed ({kind} device)") for line in ui_text(record, SAMPLER_NODE))
    read, again = _rerun_reading(server, streamed())
    assert read == 0 and image_digest(server, again) == reference


def test_budget_below_the_minimum_fails_before_sampling_and_the_server_keeps_serving(server, reference):
    error = failed_run(server, streamed(budget_gb=0.001))
    assert error["node_id"] == SAMPLER_NODE
    assert "minimum of" in error["exception_message"] and "max_vram_gb" in error["exception_message"]
    assert run_digest(server, streamed()) == reference


def test_interrupt_during_a_streamed_run_then_the_next_run_is_exact(server, reference):
    rerun(server, streamed())  # loaded and attached: the long run below streams from its first step
    # Another budget (the model is placed again when the run loads, before its first step) tells
    # this run's stats from the last run's: an interrupt sent before the prompt starts executing
    # is cleared by ComfyUI, and the stats show the last run's steps until this one loads.
    long_budget_gb = BUDGET_GB + 0.01
    prompt_id = server.post("/prompt", {"prompt": streamed(long_budget_gb, steps=400)})["prompt_id"]
    _wait(lambda: _took_steps(server, long_budget_gb, 3), "the long run to take a few steps")
    server.post("/interrupt", {})
    _wait(lambda: (server.get(f"/history/{prompt_id}").get(prompt_id) or {}).get("status", {})
          .get("completed") is not None, "the interrupted run to end")
    messages = [name for name, _ in server.get(f"/history/{prompt_id}")[prompt_id]["status"]["messages"]]
    assert "execution_interrupted" in messages
    figures = stream_stats(server)
    assert figures["steps"] < 400 and figures["device_bytes"] <= figures["budget_bytes"]
    read, record = _rerun_reading(server, streamed())
    assert read == 0 and image_digest(server, record) == reference


def _rerun_reading(server, prompt: dict) -> tuple[int, dict]:
    """``rerun`` (every node executed, none from ComfyUI's cache after /free) and the bytes the
    pack read from disk during it."""
    before = stats(server)["disk_bytes_read"]
    record = rerun(server, prompt)
    return stats(server)["disk_bytes_read"] - before, record


def _took_steps(server, budget_gb: float, steps: int) -> bool:
    """Whether the run placed under ``budget_gb`` has taken ``steps`` streamed steps."""
    figures = stream_stats(server)
    return figures["budget_bytes"] == int(round(budget_gb * GIB)) and figures["steps"] >= steps


def _wait(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)
