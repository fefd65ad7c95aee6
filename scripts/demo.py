"""`make demo`: start ComfyUI with the pack, queue the example workflow three times, report each run.

Between the runs ComfyUI's own caches are emptied (`POST /free`, as when a user switches
workflows), so every node runs again: the loader is served by the ModelManager. The third
run repeats the second with `stream_layers` on and a VRAM budget too small for the UNet: its
blocks stream through a ring of slots (on the simulated device where there is no GPU), and
its pixels must equal the second run's. Prints each run's bytes read from disk (from
/streamloader/stats), seconds and, for the streamed run, the sampler node's figures; saves
the image to out/demo.png and stops the server.
"""
import json
import os
import shutil
import sys
import time

from comfy_server import REPO, ComfyServer
from ui_workflow import API_EXAMPLE as WORKFLOW
from ui_workflow import TEMPLATES

STREAMED = TEMPLATES["StreamLoader SD1.5 streamed"]["1"]  # the streamed template's loader inputs
RUNS = (("cold", 42, {}), ("warm", 43, {}), ("streamed", 43, STREAMED))


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
        pixels = {}
        for label, seed, toggles in RUNS:
            prompt["1"]["inputs"].update(toggles)
            prompt["5"]["inputs"]["seed"] = seed
            record, disk, seconds = timed_run(server, prompt)
            print(f"{label + ' run:':14}{disk / 2**20:8.1f} MiB read from disk, {seconds:6.2f} s")
            for line in record["outputs"]["5"]["text"][1:] if toggles else []:
                print(f"    {line}")
            pixels[label] = server.pixel_digest(record, "7")
            server.post("/free", {"unload_models": True, "free_memory": True})
        print(f"streamed pixels equal the warm run's: {pixels['streamed'] == pixels['warm']}")
        image = record["outputs"]["7"]["images"][0]
        os.makedirs(os.path.join(REPO, "out"), exist_ok=True)
        target = os.path.join(REPO, "out", "demo.png")
        shutil.copy(server.output_path(image), target)
        print(f"image: {os.path.relpath(target, REPO)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
