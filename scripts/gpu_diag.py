"""`gpu_check.py --stages diag`: the tests that failed on the H200 (2026-11-28), each in its own
pytest process, under the variants that tell their causes apart.

- ``default``: as the test stage ran them;
- ``pack_pins_off``: ``STREAMLOADER_PINNED_CAP_GB=0``, the pack page-locks no slab (ComfyUI's own
  pins of lowvram weights stay);
- ``comfy_pins_off``: ComfyUI's ``--disable-pinned-memory`` (``args.disable_pinned_memory``, read
  when comfy.model_management is imported, on 0.3.75 and upstream), set by the plugin
  ``pytest_diag_pins``: nothing is page-locked, the pack pins through ComfyUI's book;
- ``launch_blocking``: ``CUDA_LAUNCH_BLOCKING=1``, so that a CUDA error is raised by the call that
  made it.

Reading the cascade's row: fails by default but passes with the pack's pins off: the pack's slabs;
passes only with ComfyUI's pins off: a pin of ComfyUI's over memory freed under it; fails in every
variant: not page-locking (the launch-blocking run names the call).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OOM_RETRY = "tests/comfy/test_clone_options.py::test_the_oom_retry_is_bound_to_its_engine_not_found_through_the_manager"
PINS_PLUGIN_ENV = "STREAMLOADER_DIAG_DISABLE_PINNED_MEMORY"
VARIANTS = {
    "default": {},
    "pack_pins_off": {"STREAMLOADER_PINNED_CAP_GB": "0"},
    "comfy_pins_off": {PINS_PLUGIN_ENV: "1"},
    "launch_blocking": {"CUDA_LAUNCH_BLOCKING": "1"},
}


@dataclass(frozen=True)
class Target:
    """Tests run together in one process, in order; ``exclusive``: they fill the device, so they
    run alone, after the others."""

    name: str
    tests: tuple[str, ...]
    variants: tuple[str, ...] = ("default",)
    marks: str = ""
    timeout_s: float = 90
    exclusive: bool = False
    versions: str = "all"  # or "oldest": where the variant is decided (0.3.75 failed first)


TARGETS = (
    # The OOM-retry test, then the tests after which the CUDA error first came (both versions).
    Target("cascade", (OOM_RETRY, "tests/comfy/test_dynamic.py", "tests/comfy/test_nodes.py"),
           ("default", "pack_pins_off", "comfy_pins_off"), timeout_s=120),
    Target("cascade", (OOM_RETRY, "tests/comfy/test_dynamic.py", "tests/comfy/test_nodes.py"),
           ("launch_blocking",), timeout_s=120, versions="oldest"),
    Target("oom_retry", (OOM_RETRY,), timeout_s=60),
    Target("dynamic", ("tests/comfy/test_dynamic.py",), timeout_s=80),
    Target("pinning", ("tests/comfy/test_pinning.py",), timeout_s=45),
    Target("soak", ("tests/server/test_soak.py",), timeout_s=150),
    Target("gpu", ("tests/comfy/test_gpu_streaming.py",), ("default", "pack_pins_off"), marks="gpu",
           timeout_s=45, exclusive=True),
)


@dataclass(frozen=True)
class Job:
    name: str
    target: str
    version: str
    variant: str
    tests: tuple[str, ...]
    marks: str
    env: dict
    timeout_s: float
    exclusive: bool


def plan(versions: list[str], targets: tuple[Target, ...] = TARGETS) -> list[Job]:
    """Every (target, variant, version) as a job; the shared ones first, the exclusive ones last.

    Args:
        versions: the ComfyUI versions present, oldest first.
    """
    jobs = []
    for t in targets:
        for variant in t.variants:
            for version in versions if t.versions == "all" else versions[:1]:
                jobs.append(Job(f"diag-{t.name}-{variant}-{version}", t.name, version, variant, t.tests, t.marks,
                                dict(VARIANTS[variant]), t.timeout_s, t.exclusive))
    return sorted(jobs, key=lambda j: j.exclusive)  # stable: the table's order within each group


_ERROR_LINE = re.compile(r"^E\s+((?:[\w.]*(?:Error|Exception|Failed)|Failed|assert)\b.*)$", re.M)


def first_error(log: str) -> str | None:
    """The first error pytest printed (``E   torch.AcceleratorError: CUDA error: ...``), or its
    first ``E`` line, or None."""
    match = _ERROR_LINE.search(log)
    if match:
        return match.group(1).strip()[:300]
    line = next((line for line in log.splitlines() if line.startswith("E ")), None)
    return line[1:].strip()[:300] if line else None


def outcome(job: dict) -> str:
    """One job's cell in the summary: pass, fail (with the first failing test), timeout, or not run."""
    if job.get("not_run"):
        return "not run"
    if job.get("timed_out"):
        return "timeout"
    if job.get("failed"):
        return f"fail: {job['failures'][0].rsplit('::', 1)[-1]}" if job.get("failures") else "fail"
    return "pass" if job.get("returncode") == 0 else f"exit {job.get('returncode')}"


def summary(jobs: list[dict]) -> dict:
    """{target: {version: {variant: outcome}}}."""
    out: dict = {}
    for job in jobs:
        out.setdefault(job["target"], {}).setdefault(job["version"], {})[job["variant"]] = outcome(job)
    return out
