"""A real ComfyUI server with this pack loaded, for `make serve`, `make demo` and the server tests.

Each server gets its own base directory (custom_nodes/ with a link to this repo, output/,
user/ ...), the models folder as extra model paths, and a free loopback port.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "ComfyUI-StreamLoader"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "vae", "loras")
FRONT_END_ROOT_ENV = "STREAMLOADER_FRONT_END_ROOT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path: str, models_dir: str, port: int | None = None, base_dir: str | None = None,
                 more_models_dirs: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 cpu: bool | None = None, extra_args: list[str] = ()):
        """``more_models_dirs``: model folders served besides ``models_dir``.
        ``env``: variables set for the server on top of this process's environment.
        ``cpu``: run with ``--cpu`` (default: where there is no ``nvidia-smi``).
        ``extra_args``: more of main.py's flags (``--reserve-vram 4`` ...)."""
        self.extra_args = list(extra_args)
        self.cpu = shutil.which("nvidia-smi") is None if cpu is None else cpu
        self.comfy_path = comfy_path
        self.extra_env = dict(env or {})
        self.models_dir = os.path.abspath(models_dir)
        self.more_models_dirs = [os.path.abspath(d) for d in more_models_dirs]
        self.port = port or free_port()
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="streamloader-comfy-")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base_dir, "server.log")
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", self.base_dir,
               "--extra-model-paths-config", self._write_model_paths(), *self._own_user_data()]
        if self.cpu:
            cmd.append("--cpu")
        if os.environ.get(FRONT_END_ROOT_ENV):  # headless, without the frontend package (`make gpu-check`)
            cmd += ["--front-end-root", os.environ[FRONT_END_ROOT_ENV]]
        return cmd + self.extra_args

    def _own_user_data(self) -> list[str]:
        """Flags giving this server its own user directory and database: concurrent servers must
        not share them, and ComfyUI's default database lies in its own folder, not the base directory."""
        user = os.path.join(self.base_dir, "user")
        os.makedirs(user, exist_ok=True)
        accepted = accepted_flags(self.comfy_path)
        flags = ["--user-directory", user] if "--user-directory" in accepted else []
        if "--database-url" in accepted:
            flags += ["--database-url", "sqlite:///" + os.path.join(user, "comfyui.db")]
        return flags

    def _write_model_paths(self) -> str:
        os.makedirs(os.path.join(self.base_dir, "custom_nodes"), exist_ok=True)
        link = os.path.join(self.base_dir, "custom_nodes", PACK_DIR_NAME)
        if not os.path.lexists(link):
            os.symlink(REPO, link)
        path = os.path.join(self.base_dir, "extra_model_paths.yaml")
        with open(path, "w") as f:
            for i, models_dir in enumerate(dict.fromkeys([self.models_dir, *self.more_models_dirs])):
                f.write(f"streamloader_{i}:\n  base_path: {models_dir}\n")
                f.writelines(f"  {folder}: {folder}\n" for folder in MODEL_FOLDERS)
        return path

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        """Start the server; ``timeout`` (s) is generous: upstream ComfyUI imports about 900 nodes,
        which takes 20-35 s alone on 2 cores and minutes when test runs share them."""
        env = {**os.environ, "DO_NOT_TRACK": "1", **self.extra_env}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}; see {self.log_path}:\n{self.log_tail()}")
            try:
                self.get("/object_info/StreamLoaderCheckpoint")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            self.stop()
            raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.log_path}")
        self._check_pack_imported()
        return self

    def _check_pack_imported(self) -> None:
        info = self.get("/object_info/StreamLoaderCheckpoint")
        if "StreamLoaderCheckpoint" not in info:
            self.stop()
            raise RuntimeError(f"ComfyUI started without the StreamLoader nodes; see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body else None

    def submit(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue an API-format prompt and wait for it; returns its /history record, failed or not."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.get(f"/history/{prompt_id}").get(prompt_id)
            if record and record.get("status", {}).get("completed") is not None:
                return record
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue an API-format prompt and wait for it; returns its /history record, raises if it failed."""
        record = self.submit(prompt, timeout)
        error = execution_error(record)
        if error is not None:
            where = "".join(error.get("traceback", [])[-2:])
            raise RuntimeError(f"prompt failed in node {error.get('node_id')} ({error.get('node_type')}): "
                               f"{error['exception_message'].strip()}\n{where}")
        return record

    def output_path(self, image: dict) -> str:
        return os.path.join(self.base_dir, "output", image.get("subfolder", ""), image["filename"])

    def pixel_digest(self, record: dict, node: str) -> str:
        """Digest of the pixels of the first image a node saved (the PNG's metadata holds the
        prompt, which differs between runs)."""
        from PIL import Image

        with Image.open(self.output_path(record["outputs"][node]["images"][0])) as png:
            return hashlib.sha256(png.tobytes()).hexdigest()


def accepted_flags(comfy_path: str) -> set[str]:
    """The command-line flags this ComfyUI's main.py accepts (read from comfy/cli_args.py)."""
    with open(os.path.join(comfy_path, "comfy", "cli_args.py")) as f:
        return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", f.read()))


def executed_nodes(record: dict) -> set[str]:
    """Ids of the nodes that ran (were not served from ComfyUI's cache) in a /history record."""
    cached: set[str] = set()
    for name, data in record["status"]["messages"]:
        if name == "execution_cached":
            cached.update(data["nodes"])
    return set(record["prompt"][2]) - cached


def execution_error(record: dict) -> dict | None:
    """The ``execution_error`` message of a failed /history record (node_id, exception_message,
    executed ...), or None if the prompt succeeded."""
    if record["status"].get("status_str") != "error":
        return None
    errors = [data for name, data in record["status"]["messages"] if name == "execution_error"]
    return errors[0] if errors else {"exception_message": json.dumps(record["status"]["messages"])[:2000]}


def release(server: ComfyServer, timeout: float = 60.0) -> dict:
    """POST /streamloader/release and wait until the prompt worker applied it (between prompts);
    returns the route's answer (what it will release)."""
    answer = server.post("/streamloader/release", {})
    deadline = time.monotonic() + timeout
    while applied_release(server, answer["id"]) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"release {answer['id']} was not applied within {timeout:.0f} s")
        time.sleep(0.02)
    return answer


def applied_release(server: ComfyServer, release_id: int) -> dict | None:
    """The worker's record of an applied release (requested_at, applied_at, released), or None."""
    applied = server.get("/streamloader/stats")["releases"]["applied"]
    return next((r for r in applied if r["id"] == release_id), None)


def serve_forever(comfy_path: str, port: int, models_dir: str, *more_models_dirs: str) -> None:
    """`make serve`: the demo models in ``models_dir``, and those of ``more_models_dirs`` too."""
    with ComfyServer(comfy_path, models_dir, port=port, more_models_dirs=more_models_dirs) as server:
        listed = ", ".join(dict.fromkeys([server.models_dir, *server.more_models_dirs]))
        print(f"ComfyUI with StreamLoader on {server.url} (models: {listed}); Ctrl-C stops it", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    serve_forever(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
