"""A real ComfyUI server, API workflows queued twice: the second run reads nothing from disk."""
import json
import os
import shutil
import subprocess

import pytest
from comfy_server import executed_nodes
from server_helpers import disk_read, image_digest, release, reset, sd15_prompt, with_lora

pytestmark = pytest.mark.server


@pytest.fixture
def prompt():
    return sd15_prompt()


@pytest.fixture(autouse=True)
def cold(server):
    """Every test starts with nothing held by ComfyUI or the pack."""
    reset(server)


def test_stats_route_shape(server, prompt):
    server.run(prompt)
    stats = server.get("/streamloader/stats")
    assert isinstance(stats["disk_bytes_read"], int) and isinstance(stats["h2d_bytes"], int)
    (model,) = stats["models"]
    assert model["path"].endswith("tiny_sd15.safetensors")
    assert model["bytes"] > 0 and model["host_resident_bytes"] > 0
    assert {"vram_resident_bytes", "budget_bytes"} <= model.keys()
    assert server.get("/api/streamloader/stats")["disk_bytes_read"] == stats["disk_bytes_read"]


def test_peak_vram_is_reported_and_reset(server, prompt, comfy_device):
    """The process's torch peak (what bench/e2e_bench.py reads per row); null without CUDA."""
    server.run(prompt)
    peak = server.get("/streamloader/stats")["peak_vram_bytes"]
    after_reset = server.post("/streamloader/peak/reset", {})["peak_vram_bytes"]
    if comfy_device == "cpu":
        assert peak is None and after_reset is None
    else:
        assert peak > 0 and after_reset < peak


def test_second_run_reads_nothing_even_after_free(server, prompt):
    first, record = disk_read(server, prompt)
    assert first > 0
    prompt["5"]["inputs"]["seed"] = 43
    second, _ = disk_read(server, prompt)
    assert second == 0
    server.post("/free", {"unload_models": True, "free_memory": True})
    third, record3 = disk_read(server, prompt)
    assert third == 0
    assert "1" in executed_nodes(record3), "the loader ran again after /free"


def test_a_toggle_that_keeps_the_bytes_reruns_the_loader_without_reading(server, prompt):
    disk_read(server, prompt)
    prompt["1"]["inputs"]["stream_layers"] = True
    read, record = disk_read(server, prompt)
    assert "1" in executed_nodes(record) and read == 0


def test_outputs_repeat_exactly_and_release_reads_again(server, prompt):
    _, first = disk_read(server, prompt)
    prompt["7"]["inputs"]["filename_prefix"] = "again"
    server.post("/free", {"unload_models": True, "free_memory": True})
    _, second = disk_read(server, prompt)
    assert image_digest(server, first) == image_digest(server, second)
    assert release(server)["released"] == 1  # no /free: the release empties ComfyUI's node cache too
    read, third = disk_read(server, prompt)
    assert read > 0 and "1" in executed_nodes(third) and server.get("/streamloader/stats")["models"]


def test_core_nodes_consume_the_packs_outputs(server, prompt):
    core = with_lora(prompt, 0.7)
    core["5"] = {"class_type": "KSampler", "inputs": {**core["5"]["inputs"]}}
    core["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    record = server.run(core)
    assert record["outputs"]["7"]["images"]
    read, _ = disk_read(server, {**core, "5": {**core["5"], "inputs": {**core["5"]["inputs"], "seed": 9}}})
    assert read == 0


def test_comfy_cli_runs_a_workflow(server, prompt, tmp_path):
    venv = os.environ.get("VENV")
    comfy = os.path.join(venv, "bin", "comfy") if venv else shutil.which("comfy")
    if comfy is None:  # `make test` installs it; `make gpu-check` carries no CLI
        pytest.skip("comfy-cli is not installed here")
    prompt["5"]["inputs"]["seed"] = 77
    workflow = tmp_path / "wf_api.json"
    workflow.write_text(json.dumps(prompt))
    env = {**os.environ, "HOME": str(tmp_path), "DO_NOT_TRACK": "1"}
    result = subprocess.run([comfy, "--skip-prompt", f"--workspace={server.comfy_path}", "run", "--workflow",
                             str(workflow), "--wait", "--host", "127.0.0.1", "--port", str(server.port),
                             "--timeout", "120"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.get("/streamloader/stats")["models"]
