"""Helpers shared by the server tests: workflows, pixel digests, models folders with chosen files."""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from collections.abc import Callable

import torch
from comfy_server import MODEL_FOLDERS, REPO, ComfyServer, executed_nodes, execution_error, release

WORKFLOW = os.path.join(REPO, "api_workflows", "streamloader_sd15_api.json")
SAVE_NODE = "7"
LOADER_NODE = "1"
SAMPLER_NODE = "5"
_FLOAT_DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


def sd15_prompt(**loader_inputs) -> dict:
    """The example workflow (checkpoint loader → sampler → decode → save), loader inputs overridden."""
    with open(WORKFLOW) as f:
        prompt = json.load(f)
    prompt[LOADER_NODE]["inputs"].update(loader_inputs)
    return prompt


def with_split_loaders(prompt: dict, unet_name: str, vae_name: str) -> dict:
    """``prompt`` with the UNet from StreamLoaderDiffusionModel (node 10) and the VAE from
    StreamLoaderVAE (node 11); CLIP still comes from the checkpoint loader."""
    out = copy.deepcopy(prompt)
    toggles = {k: v for k, v in prompt[LOADER_NODE]["inputs"].items() if k != "ckpt_name"}
    out["10"] = {"class_type": "StreamLoaderDiffusionModel",
                 "inputs": {"unet_name": unet_name, "weight_dtype": "default", **toggles}}
    out["11"] = {"class_type": "StreamLoaderVAE", "inputs": {"vae_name": vae_name,
                 "offload_to_cpu": toggles["offload_to_cpu"], "eager_load": toggles["eager_load"]}}
    out[SAMPLER_NODE]["inputs"]["model"] = ["10", 0]
    out["6"]["inputs"]["vae"] = ["11", 0]
    return out


def free(server: ComfyServer) -> None:
    """Empty ComfyUI's caches, so that every node of the next prompt runs (the pack keeps its models)."""
    server.post("/free", {"unload_models": True, "free_memory": True})


def with_lora(prompt: dict, strength: float = 0.7, lora_name: str = "tiny_sd15_lora.safetensors") -> dict:
    """``prompt`` with core LoraLoader (node 8) between the loaders and the sampler and text encoders."""
    out = copy.deepcopy(prompt)
    out["8"] = {"class_type": "LoraLoader", "inputs": {
        "model": out[SAMPLER_NODE]["inputs"]["model"], "clip": [LOADER_NODE, 1], "lora_name": lora_name,
        "strength_model": strength, "strength_clip": strength}}
    out[SAMPLER_NODE]["inputs"]["model"] = ["8", 0]
    out["2"]["inputs"]["clip"] = out["3"]["inputs"]["clip"] = ["8", 1]
    return out


def reset(server: ComfyServer) -> None:
    """Nothing held by ComfyUI or the pack afterwards."""
    free(server)
    release(server)


def rerun(server: ComfyServer, prompt: dict, tries: int = 3) -> dict:
    """Run ``prompt`` with every node executed (none served from ComfyUI's cache).

    ComfyUI's worker applies ``/free`` after it next wakes, and after the prompt it finds
    queued by then: a prompt that wins that race runs on the old cache, so it is run again."""
    for _ in range(tries):
        free(server)
        record = server.run(prompt)
        if executed_nodes(record) == set(record["prompt"][2]):
            return record
    raise AssertionError(f"ComfyUI served nodes from its cache after /free, {tries} times")


def stats(server: ComfyServer) -> dict:
    return server.get("/streamloader/stats")


def disk_read(server: ComfyServer, prompt: dict) -> tuple[int, dict]:
    """Run ``prompt``; returns (bytes the pack read from disk during it, its /history record)."""
    before = stats(server)["disk_bytes_read"]
    record = server.run(prompt)
    return stats(server)["disk_bytes_read"] - before, record


def image_digest(server: ComfyServer, record: dict, node: str = SAVE_NODE) -> str:
    return server.pixel_digest(record, node)


def run_digest(server: ComfyServer, prompt: dict) -> str:
    return image_digest(server, server.run(prompt))


def failed_run(server: ComfyServer, prompt: dict) -> dict:
    """Run ``prompt``, which must fail; returns its ``execution_error`` message."""
    record = server.submit(prompt)
    error = execution_error(record)
    assert error is not None, f"the prompt was expected to fail but produced {record['outputs']}"
    return error


def ui_text(record: dict, node: str) -> list[str]:
    return record["outputs"][node]["text"]


def linked_models_dir(root: str, source: str) -> str:
    """A models folder under ``root`` whose files are symlinks to those of ``source``; tests add
    or replace files in it without touching ``source``."""
    for folder in MODEL_FOLDERS:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name in os.listdir(os.path.join(source, folder)):
            os.symlink(os.path.join(source, folder, name), os.path.join(root, folder, name))
    return root


def read_raw_header(path: str) -> tuple[dict, int]:
    """(the JSON header of a safetensors file, the offset where its data starts)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def rewrite_header(src: str, dst: str, edit: Callable[[dict], None]) -> str:
    """Copy ``src`` to ``dst`` with its header changed by ``edit`` (in place) and its data unchanged."""
    header, data_start = read_raw_header(src)
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)) + raw)
        fin.seek(data_start)
        shutil.copyfileobj(fin, fout, 16 * 2**20)
    return dst


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def rss_parts(pid: int) -> dict[str, int]:
    """Resident memory of a process by kind (bytes): ``RssAnon`` (heap, anonymous mappings),
    ``RssFile`` (mapped files: libraries, safetensors), ``RssShmem`` (shared memory, device mappings)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
    return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}


def rss_by_mapping(pid: int) -> dict[str, int]:
    """Resident bytes of a process per mapped object (a library's or device file's base name,
    ``[heap]``, ``[anon]`` for anonymous mappings), from /proc/<pid>/smaps."""
    out: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                path = head[5].strip() if len(head) > 5 else ""
                name = os.path.basename(path) if path.startswith("/") else (path or "[anon]")
            elif head and head[0] == "Rss:":
                out[name] = out.get(name, 0) + int(head[1]) * 1024
    return out


def negate_tensor_in_place(path: str, name: str) -> None:
    """Flip the sign of one float tensor in ``path``: same size and inode, new bytes and mtime."""
    header, data_start = read_raw_header(path)
    entry = header[name]
    start, end = (data_start + offset for offset in entry["data_offsets"])
    with open(path, "r+b") as f:
        f.seek(start)
        values = torch.frombuffer(bytearray(f.read(end - start)), dtype=_FLOAT_DTYPES[entry["dtype"]])
        f.seek(start)
        f.write((-values).view(torch.uint8).numpy().tobytes())
