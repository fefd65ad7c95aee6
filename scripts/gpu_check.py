"""`make gpu-check`: the GPU test mode and the benchmark, on a GPU machine that has torch only.

Reads what `make gpu-pack` put in .gpu/ (ComfyUI copies as .tar.xz, wheels), and in stages:
1. installs the wheels (`pip install --no-deps --target`) and puts them on PYTHONPATH;
2. generates the tiny models (scripts/make_models.py);
3. runs tests/unit, tests/comfy and tests/server on each ComfyUI copy, on STREAMLOADER_TEST_DEVICE
   (default: cuda where torch sees a GPU), servers headless (`--front-end-root` an empty folder):
   all but the `gpu` tests on both copies at once, then the `gpu` tests one copy at a time;
4. runs bench/stream_bench.py;
5. end to end (bench/e2e_bench.py): an SDXL-sized checkpoint made on the GPU (scripts/make_sdxl.py),
   then real servers of the newest ComfyUI copy, core's loader against the pack's;
6. only when asked (`--stages diag`): the tests that failed on the H200, each in its own process,
   under the variants of scripts/gpu_diag.py, with each one's outcome and first error;
and writes gpu_check.json (device, date, versions, test counts in all and per ComfyUI version,
the benchmarks' JSON paths) to $OUT, or bench/results/, after every stage, and the stages'
output to gpu_check.log beside it.
Stages share one deadline (--minutes); a stage cut short by it is recorded as timed out. The
tests get what the later stages' reserves leave, which at the default 9 minutes is too little:
with the device tool's 15 minutes, run `--stages bench,e2e --minutes 7` and then, on the warm
machine, `--stages tests --minutes 5` (the README has the recipe).

Usage: python3 scripts/gpu_check.py [--pack .gpu] [--minutes 9] [--stages tests,bench,e2e|diag] [--pytest-args ARGS]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

import gpu_diag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DIRS = ["tests/unit", "tests/comfy", "tests/server"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", default=os.path.join(REPO, ".gpu"), help="what `make gpu-pack` prepared")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "bench", "results"))
    p.add_argument("--minutes", type=float, default=9, help="deadline for all stages together")
    p.add_argument("--stages", default="tests,bench,e2e", help="which of tests, bench, e2e, diag to run")
    p.add_argument("--diag-parallel", type=int, default=8, help="diag jobs run at once (the exclusive ones alone)")
    p.add_argument("--bench-reserve-s", type=float, default=170,
                   help="seconds kept for the benchmark (134 s on an H200 on 2026-11-28, with the earlier engine)")
    p.add_argument("--e2e-reserve-s", type=float, default=200,
                   help="seconds kept for the end-to-end rows (unmeasured on a GPU; about 200 estimated on an H200)")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments (e.g. `-k gpu`)")
    p.add_argument("--e2e-args", default="", help="extra bench/e2e_bench.py arguments (e.g. `--steps 10`)")
    p.add_argument("--skip-install", action="store_true",
                   help="use this Python's packages as they are (a rehearsal where ComfyUI's needs are installed)")
    return p.parse_args()


class Check:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.deadline = time.monotonic() + opts.minutes * 60
        self.work = tempfile.mkdtemp(prefix="streamloader-gpu-check-")
        self.site = os.path.join(self.work, "site")
        self.models = os.path.join(self.work, "models")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1"}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)  # see notes/test-environment.md: 6 s per torch import
        # Servers start headless: the device has no frontend package.
        self.env["STREAMLOADER_FRONT_END_ROOT"] = os.path.join(self.work, "front-end")
        os.makedirs(self.env["STREAMLOADER_FRONT_END_ROOT"])
        os.makedirs(opts.out, exist_ok=True)
        open(os.path.join(opts.out, "gpu_check.log"), "w").close()
        self.result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "python": sys.version.split()[0], "stages": []}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cwd: str = REPO, env: dict | None = None,
            limit_s: float | None = None) -> dict:
        """Run one stage's command with its output in OUT/<name>.log; it is stopped after ``limit_s``
        or at the deadline, whichever comes first."""
        return self.run_together({name: (cmd, env)}, limit_s, cwd)[name]

    def run_together(self, commands: dict[str, tuple[list[str], dict | None]], limit_s: float | None = None,
                     cwd: str = REPO) -> dict[str, dict]:
        """Run stages at the same time (name: (command, env)), each as ``run`` does."""
        until = time.monotonic() + min(self.remaining(), limit_s or self.remaining())
        started = {name: self._start(name, cmd, env, cwd) for name, (cmd, env) in commands.items()}
        return {name: self._finish(name, *started[name], until) for name in started}

    def run_pool(self, jobs: list[tuple[str, list[str], dict, float]], parallel: int) -> dict[str, dict]:
        """Run (name, command, env, limit_s) jobs ``parallel`` at a time, each stopped after its own
        limit or at the deadline; a job the deadline leaves no time to start is not started."""
        waiting, running, done = list(jobs), {}, {}
        while waiting or running:
            while waiting and len(running) < parallel and self.remaining() > 5:
                name, cmd, env, limit_s = waiting.pop(0)
                running[name] = (*self._start(name, cmd, env, REPO), time.monotonic() + min(limit_s, self.remaining()))
            if not running:
                break
            for name, (process, cmd, log_path, start, until) in list(running.items()):
                if process.poll() is not None or time.monotonic() > until:
                    done[name] = self._finish(name, process, cmd, log_path, start, until)
                    del running[name]
            time.sleep(0.2)
        return {**done, **{name: {"name": name, "not_run": "deadline reached"} for name, *_ in waiting}}

    def _start(self, name: str, cmd: list[str], env: dict | None, cwd: str) -> tuple:
        log_path = os.path.join(self.work, f"{name}.log")
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own group: servers it starts die with it
        return process, cmd, log_path, time.monotonic()

    def _finish(self, name: str, process: subprocess.Popen, cmd: list[str], log_path: str, start: float,
                until: float) -> dict:
        try:
            code = process.wait(timeout=max(until - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            _stop(process)
            code = None
        stage = {"name": name, "seconds": round(time.monotonic() - start, 1), "returncode": code,
                 "timed_out": code is None, "log": log_path}
        stage.update({"junit": a[len("--junitxml="):] for a in cmd if a.startswith("--junitxml=")})
        self.result["stages"].append(stage)
        with open(log_path, errors="replace") as f, open(os.path.join(self.opts.out, "gpu_check.log"), "a") as log:
            log.write(f"==== {name}: {shlex.join(cmd)}\n{f.read()}\n")  # one file: the device tool returns 8
        print(f"   {name}: {'timed out' if code is None else f'exit {code}'} after {stage['seconds']} s; "
              f"last lines:\n{_tail(log_path)}", flush=True)
        self.write()
        return stage

    def write(self) -> str:
        path = os.path.join(self.opts.out, "gpu_check.json")
        with open(path, "w") as f:
            json.dump(self.result, f, indent=1)
        return path

    def probe(self) -> None:
        """Device, torch and ComfyUI versions, without touching CUDA in this process."""
        code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
                "'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if c else 'CPU (no CUDA)'}))")
        self.result.update(json.loads(subprocess.check_output([sys.executable, "-c", code], env=self.env)))
        self.result["comfyui"] = {comfyui_version(p): p for p in self.comfy_copies()}
        self.result["test_device"] = self.env.get("STREAMLOADER_TEST_DEVICE") or \
            ("cuda" if self.result["device"] != "CPU (no CUDA)" else "cpu")
        print(f"== device: {self.result['device']}, torch {self.result['torch']}, ComfyUI "
              f"{', '.join(self.result['comfyui'])}, tests on {self.result['test_device']}", flush=True)

    def comfy_copies(self) -> list[str]:
        """The ComfyUI copies of the pack, unpacked into the work folder."""
        archives = sorted(glob.glob(os.path.join(self.opts.pack, "comfyui-*.tar.xz")))
        if not archives:
            raise SystemExit(f"no ComfyUI copy in {self.opts.pack}; run `make gpu-pack` on a machine with the "
                             "package registries and carry the folder (device tool: carry [\".gpu\"])")
        for archive in archives:
            with tarfile.open(archive) as tar:
                tar.extractall(self.work, filter="data")
        return [os.path.join(self.work, os.path.basename(a)[:-len(".tar.xz")]) for a in archives]

    def install(self) -> None:
        wheels = sorted(glob.glob(os.path.join(self.opts.pack, "wheels", "*.whl")))
        self.result["wheels"] = [os.path.basename(w) for w in wheels]
        self.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--disable-pip-version-check", "--target", self.site, *wheels])
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.site, self.env.get("PYTHONPATH")]))

    def make_models(self) -> None:
        comfy = self.result["comfyui"][min(self.result["comfyui"], key=_version_key)]  # the oldest: 0.3.75
        env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [comfy, self.env.get("PYTHONPATH")]))}
        self.run("models", [sys.executable, os.path.join(REPO, "scripts", "make_models.py"), self.models],
                 cwd=comfy, env=env)

    def pytest(self, version: str, marks: str, limit_s: float) -> tuple[list[str], dict]:
        """The command and environment of the tests marked ``marks`` on one ComfyUI version."""
        env = {**self.env, "COMFYUI_PATH": self.result["comfyui"][version], "STREAMLOADER_MODELS": self.models,
               # No test starts in the last 60 s of the stage: pytest ends in time and writes its report.
               "STREAMLOADER_TEST_DEADLINE": str(time.time() + limit_s - 60),
               # The load test's per-cycle memory figures, kept when it passes (pytest keeps no output then).
               "STREAMLOADER_LOAD_REPORT": os.path.join(self.opts.out, f"load_memory-{version}.json"),
               "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(REPO, "scripts"), self.env.get("PYTHONPATH")]))}
        junit = os.path.join(self.work, f"junit-{version}-{marks.replace(' ', '-')}.xml")
        return [sys.executable, "-m", "pytest", "-p", "pytest_deadline", *TEST_DIRS, "-q", "-rfE", "-m", marks,
                f"--junitxml={junit}", *shlex.split(self.opts.pytest_args)], env

    def tests(self) -> None:
        """The suite on each version: all but the `gpu` tests on every version at once (tiny models,
        that share the device without effect on each other), then the `gpu` tests, which fill the
        device, one version at a time."""
        versions = list(self.result["comfyui"])
        budget = self.remaining() - self.reserved_s()
        if budget < 120:
            self.result["tests"] = _totals({v: {"passed": 0, "failed": 0, "skipped": 0, "not_run": "deadline reached"}
                                            for v in versions})
            return
        shared_s = budget * 0.75
        stages = self.run_together({f"tests-{v}": self.pytest(v, "not gpu", shared_s) for v in versions}, shared_s)
        for i, version in enumerate(versions):
            limit = (self.remaining() - self.reserved_s()) / (len(versions) - i)
            cmd, env = self.pytest(version, "gpu", limit)
            stages[f"tests-gpu-{version}"] = self.run(f"tests-gpu-{version}", cmd, env=env, limit_s=limit)
        self.result["tests"] = _totals({v: _merge([stages[f"tests-{v}"], stages[f"tests-gpu-{v}"]]) for v in versions})

    def diag_command(self, job: gpu_diag.Job) -> tuple[list[str], dict]:
        """One diag job's pytest command and environment (its variant's variables on top)."""
        env = {**self.env, "COMFYUI_PATH": self.result["comfyui"][job.version], "STREAMLOADER_MODELS": self.models,
               "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(REPO, "scripts"), self.env.get("PYTHONPATH")])),
               **job.env}
        junit = os.path.join(self.work, f"junit-{job.name}.xml")
        return [sys.executable, "-m", "pytest", "-p", "pytest_diag_pins", *job.tests, "-q", "-rfE", "-p", "no:cacheprovider",
                *(["-m", job.marks] if job.marks else []), f"--junitxml={junit}"], env

    def diag(self) -> None:
        """The failing tests alone, per variant (scripts/gpu_diag.py): the shared jobs
        ``--diag-parallel`` at a time, then the ones that fill the device, one at a time."""
        jobs = gpu_diag.plan(sorted(self.result["comfyui"], key=_version_key))
        shared = [(j.name, *self.diag_command(j), j.timeout_s) for j in jobs if not j.exclusive]
        stages = self.run_pool(shared, self.opts.diag_parallel)
        stages.update(self.run_pool([(j.name, *self.diag_command(j), j.timeout_s) for j in jobs if j.exclusive], 1))
        self.result["diag"] = diag_results(jobs, stages)
        self.write()

    def reserved_s(self) -> float:
        """Seconds the tests leave for the later stages."""
        stages = self.stages()
        return self.opts.bench_reserve_s * ("bench" in stages) + self.opts.e2e_reserve_s * ("e2e" in stages)

    def stages(self) -> list[str]:
        stages = self.opts.stages.split(",")
        unknown = set(stages) - {"tests", "bench", "e2e", "diag"}
        if unknown:
            raise SystemExit(f"--stages {self.opts.stages}: no stage {', '.join(sorted(unknown))}; "
                             "use some of tests, bench, e2e, diag, comma-separated")
        return stages

    def bench(self) -> None:
        comfy = self.result["comfyui"][min(self.result["comfyui"], key=_version_key)]
        e2e_s = self.opts.e2e_reserve_s if "e2e" in self.stages() else 0
        stage = self.run("bench", [sys.executable, os.path.join(REPO, "bench", "stream_bench.py"),
                                   "--comfy", comfy, "--out", self.opts.out], limit_s=max(self.remaining() - e2e_s, 60))
        path = os.path.join(self.opts.out, "stream_bench.json")
        self.result["bench"] = {"json": path if os.path.exists(path) and stage["returncode"] == 0 else None,
                                "seconds": stage["seconds"], "returncode": stage["returncode"]}

    def e2e(self) -> None:
        """An SDXL-sized checkpoint made here, then bench/e2e_bench.py on the newest ComfyUI copy
        (what users run: DynamicVRAM on); its configurations stop starting a minute before the deadline."""
        comfy = self.result["comfyui"][max(self.result["comfyui"], key=_version_key)]
        env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [comfy, self.env.get("PYTHONPATH")]))}
        checkpoint = os.path.join(self.work, "sdxl", "sdxl_random_fp16.safetensors")
        made = self.run("e2e-model", [sys.executable, os.path.join(REPO, "scripts", "make_sdxl.py"), checkpoint],
                        cwd=comfy, env=env)
        if made["returncode"] != 0:
            self.result["e2e"] = {"json": None, "returncode": made["returncode"]}
            return
        minutes = max(self.remaining() - 60, 30) / 60
        stage = self.run("e2e", [sys.executable, os.path.join(REPO, "bench", "e2e_bench.py"), "--comfy", comfy,
                                 "--checkpoint", checkpoint, "--out", self.opts.out, "--minutes", f"{minutes:.1f}",
                                 *shlex.split(self.opts.e2e_args)])
        path = os.path.join(self.opts.out, "e2e_bench.json")
        self.result["e2e"] = {"json": path if os.path.exists(path) else None, "seconds": stage["seconds"],
                              "returncode": stage["returncode"]}


def _stop(process: subprocess.Popen) -> None:
    """Interrupt a stage's process group (pytest then stops, writes its report with the results so
    far and stops its servers), and kill it if it is still there after 20 s."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def comfyui_version(comfy: str) -> str:
    scope: dict = {}
    with open(os.path.join(comfy, "comfyui_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def junit_counts(path: str) -> dict:
    """Passed, failed (failures and errors), skipped, and the failing tests' ids, from a JUnit report;
    ``properties``: what the session recorded (record_testsuite_property)."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures, skipped, total = [], 0, 0
    for case in suite.iter("testcase"):
        total += 1
        outcome = {child.tag for child in case}
        if outcome & {"failure", "error"}:
            failures.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in outcome:
            skipped += 1
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    return {"passed": total - len(failures) - skipped, "failed": len(failures), "skipped": skipped,
            "failures": failures, "properties": properties}


def diag_results(jobs: list[gpu_diag.Job], stages: dict[str, dict]) -> dict:
    """Each diag job's outcome (counts from its JUnit report, the first error from its log), and the
    summary table {target: {version: {variant: outcome}}}."""
    out = []
    for job in jobs:
        stage = stages.get(job.name, {"not_run": "deadline reached"})
        row = {"name": job.name, "target": job.target, "version": job.version, "variant": job.variant,
               "tests": list(job.tests), "env": job.env}
        if "not_run" in stage:
            out.append({**row, "not_run": stage["not_run"]})
            continue
        junit = stage.get("junit", "")
        counts = junit_counts(junit) if os.path.exists(junit) else {"passed": 0, "failed": 0, "skipped": 0,
                                                                     "failures": []}
        with open(stage["log"], errors="replace") as f:
            error = gpu_diag.first_error(f.read())
        out.append({**row, **{k: counts[k] for k in ("passed", "failed", "skipped", "failures")},
                    "returncode": stage["returncode"], "timed_out": stage["timed_out"], "seconds": stage["seconds"],
                    "first_error": error, "log": stage["log"]})
    return {"jobs": out, "summary": gpu_diag.summary(out)}


def _merge(stages: list[dict]) -> dict:
    """One version's counts from its stages' JUnit reports (named in their commands)."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "properties": {}, "seconds": 0.0,
           "timed_out": False, "stopped_at_deadline": False}
    for stage in stages:
        junit = stage["junit"]
        missing = {"passed": 0, "failed": 1, "skipped": 0,
                   "failures": [f"{stage['name']}: pytest wrote no report (see gpu_check.log)"]}
        counts = junit_counts(junit) if os.path.exists(junit) else missing
        for key in ("passed", "failed", "skipped", "failures"):
            out[key] += counts[key]
        out["properties"].update(counts.get("properties", {}))
        out["seconds"] += stage["seconds"]
        out["timed_out"] |= stage["timed_out"]
        out["stopped_at_deadline"] |= "STREAMLOADER_TEST_DEADLINE reached" in _tail(stage["log"], 40)
    return out


def _totals(by_version: dict) -> dict:
    keys = ("passed", "failed", "skipped")
    return {**{k: sum(v.get(k, 0) for v in by_version.values()) for k in keys}, "by_comfyui": by_version}


def _tail(path: str, lines: int = 6) -> str:
    with open(path, errors="replace") as f:
        return "".join("   | " + line for line in f.readlines()[-lines:])


def main() -> None:
    opts = parse_args()
    check = Check(opts)
    stages = check.stages()  # a misspelt stage fails before anything runs
    check.probe()
    if not opts.skip_install:
        check.install()
    if "tests" in stages or "diag" in stages:
        check.make_models()
    if "tests" in stages:
        check.tests()
    if "diag" in stages:
        check.diag()
    for name, stage in (("bench", check.bench), ("e2e", check.e2e)):
        if name in stages and check.remaining() > 60:
            stage()
        elif name in stages:
            check.result[name] = {"json": None, "not_run": "deadline reached"}
    path = check.write()
    tests = check.result.get("tests") or _totals({})
    print(f"== wrote {path}: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped; "
          f"bench: {(check.result.get('bench') or {}).get('json')}; e2e: {(check.result.get('e2e') or {}).get('json')}",
          flush=True)
    incomplete = any("not_run" in v or v.get("timed_out") or v.get("stopped_at_deadline")
                     for v in tests["by_comfyui"].values()) or \
        any("not_run" in (check.result.get(name) or {}) for name in ("bench", "e2e"))
    broken = [s["name"] for s in check.result["stages"] if "junit" not in s and s["returncode"] != 0]
    if "diag" in stages:
        print(json.dumps(check.result["diag"]["summary"], indent=1), flush=True)
    if stages == ["diag"]:  # a diagnosis reports what failed; it fails only where it could not run
        sys.exit(1 if broken else 0)
    sys.exit(1 if tests["failed"] or incomplete or broken else 0)  # tests count by their reports


if __name__ == "__main__":
    main()
