"""`make demo`: start ComfyUI with the pack, queue the example workflow twice, report both runs.

Between the runs ComfyUI's own caches are emptied (`POST /free`, as when a user switches
workflows) and the seed changes, so every node runs again: the loader is served by the
ModelManager. Prints each run's bytes read from disk (from /streamloader/stats) and
seconds, saves the image to out/demo.png and stops the server.
"""
import json
import os
import shutil
import sys
import time

from comfy_server import REPO, ComfyServer

WORKFLOW = os.path.join(REPO, "example_workflows", "streamloader_sd15_api.json")


def timed_run(server: ComfyServer, prompt: dict) -> tuple[dict, int, float]:
    before = server.get("/streamloader/stats")["disk_bytes_read"]
    t0 = time.perf_counter()
    record = server.run(prompt)
    seconds = time.perf_counter() - t0
    return record, server.get("/streamloader/stats")["disk_bytes_read"] - before, seconds


def main(comfy_path: str, models_dir: str) -> None:
    with open(WORKFLOW) as f:
        prompt = json.load(f)
    with ComfyServer(comfy_path, models_dir) as server:
        print(f"ComfyUI {server.url}, workflow {os.path.relpath(WORKFLOW, REPO)}")
        for label, seed in (("cold", 42), ("warm", 43)):
            prompt["5"]["inputs"]["seed"] = seed
            record, disk, seconds = timed_run(server, prompt)
            print(f"{label} run: {disk / 2**20:8.1f} MiB read from disk, {seconds:6.2f} s")
            server.post("/free", {"unload_models": True, "free_memory": True})
        image = record["outputs"]["7"]["images"][0]
        os.makedirs(os.path.join(REPO, "out"), exist_ok=True)
        target = os.path.join(REPO, "out", "demo.png")
        shutil.copy(server.output_path(image), target)
        print(f"image: {os.path.relpath(target, REPO)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
