"""scripts/gpu_check.py's counting: a JUnit report to passed, failed and skipped, per version and in all."""
import gpu_check

REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<properties><property name="dynamic_vram" value="True"/></properties>
<testcase classname="tests.comfy.test_nodes" name="test_a"/>
<testcase classname="tests.comfy.test_nodes" name="test_b"><failure message="x"/></testcase>
<testcase classname="tests.server.test_x" name="test_c"><error message="setup"/></testcase>
<testcase classname="tests.comfy.test_gpu_streaming" name="test_d"><skipped message="needs CUDA"/></testcase>
<testcase classname="tests.unit.test_budget" name="test_e"><system-out>ok</system-out></testcase>
</testsuite></testsuites>"""


def test_a_junit_report_counts_failures_and_errors_as_failed(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(REPORT)
    counts = gpu_check.junit_counts(str(path))
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 2, 1)
    assert counts["failures"] == ["tests.comfy.test_nodes::test_b", "tests.server.test_x::test_c"]
    assert counts["properties"] == {"dynamic_vram": "True"}


def test_totals_add_up_the_versions():
    totals = gpu_check._totals({"0.3.75": {"passed": 3, "failed": 1, "skipped": 2},
                                "0.33.0": {"passed": 0, "failed": 0, "skipped": 0, "not_run": "deadline reached"}})
    assert (totals["passed"], totals["failed"], totals["skipped"]) == (3, 1, 2)
    assert set(totals["by_comfyui"]) == {"0.3.75", "0.33.0"}


def test_a_versions_stages_are_merged_and_a_missing_report_is_a_failure(tmp_path):
    (tmp_path / "a.xml").write_text(REPORT)
    log = tmp_path / "b.log"
    log.write_text("! Interrupted: STREAMLOADER_TEST_DEADLINE reached: the tests after x did not run !\n")
    stages = [{"name": "a", "junit": str(tmp_path / "a.xml"), "log": str(log), "seconds": 2.0, "timed_out": False},
              {"name": "b", "junit": str(tmp_path / "missing.xml"), "log": str(log), "seconds": 1.5,
               "timed_out": False}]
    merged = gpu_check._merge(stages)
    assert (merged["passed"], merged["failed"], merged["skipped"]) == (2, 3, 1)
    assert merged["stopped_at_deadline"] and merged["seconds"] == 3.5


# `--stages diag`: its plan, and what it reads from each job's log and report.
import gpu_diag  # noqa: E402

LOG = """tests/comfy/test_clone_options.py .F
____ ERROR at setup of test_lazy_checkpoint_reads_each_part_once_on_first_use ____
>           return t.to(
E           torch.AcceleratorError: CUDA error: invalid argument
E           Search for `cudaErrorInvalidValue' in https://docs.nvidia.com/cuda/...
"""


def test_the_default_stages_are_unchanged_and_diag_is_accepted(monkeypatch):
    monkeypatch.setattr("sys.argv", ["gpu_check.py"])
    assert gpu_check.parse_args().stages == "tests,bench,e2e"
    opts = gpu_check.argparse.Namespace(stages="diag")
    assert gpu_check.Check.stages(type("C", (), {"opts": opts})()) == ["diag"]


def test_the_diag_plan_runs_each_variant_on_each_version_and_the_device_fillers_last():
    jobs = gpu_diag.plan(["0.3.75", "0.33.0"])
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)), "one log and one report per job"
    cascade = {(j.variant, j.version) for j in jobs if j.target == "cascade"}
    assert {("default", v) for v in ("0.3.75", "0.33.0")} <= cascade
    assert ("pack_pins_off", "0.33.0") in cascade and ("comfy_pins_off", "0.3.75") in cascade
    assert ("launch_blocking", "0.3.75") in cascade and ("launch_blocking", "0.33.0") not in cascade
    assert jobs[0].tests[0] == gpu_diag.OOM_RETRY, "the OOM-retry test first, as in the failing run"
    first_exclusive = next(i for i, j in enumerate(jobs) if j.exclusive)
    assert all(j.exclusive for j in jobs[first_exclusive:]) and {j.target for j in jobs if j.exclusive} == {"gpu"}
    env = {j.variant: j.env for j in jobs}
    assert env["pack_pins_off"] == {"STREAMLOADER_PINNED_CAP_GB": "0"}
    assert env["comfy_pins_off"] == {gpu_diag.PINS_PLUGIN_ENV: "1"} and env["default"] == {}
    assert env["launch_blocking"] == {"CUDA_LAUNCH_BLOCKING": "1"}
    assert {"oom_retry", "dynamic", "pinning", "soak", "gpu"} <= {j.target for j in jobs}
    # The time: shared jobs 8 at a time, then the exclusive ones alone, about 3 minutes on an H200.
    assert sum(j.timeout_s for j in jobs if j.exclusive) <= 200


def test_the_first_error_of_a_log():
    assert gpu_diag.first_error(LOG) == "torch.AcceleratorError: CUDA error: invalid argument"
    assert gpu_diag.first_error("E       assert 66809856 == 0\n") == "assert 66809856 == 0"
    assert gpu_diag.first_error("E   some text\n") == "some text" and gpu_diag.first_error("....\n") is None


def test_diag_results_read_each_jobs_report_and_log(tmp_path):
    (tmp_path / "r.xml").write_text(REPORT)
    (tmp_path / "j.log").write_text(LOG)
    jobs = gpu_diag.plan(["0.3.75"])[:2]
    stages = {jobs[0].name: {"junit": str(tmp_path / "r.xml"), "log": str(tmp_path / "j.log"), "returncode": 1,
                             "timed_out": False, "seconds": 12.5},
              jobs[1].name: {"name": jobs[1].name, "not_run": "deadline reached"}}
    diag = gpu_check.diag_results(jobs, stages)
    first, second = diag["jobs"]
    assert (first["passed"], first["failed"], first["first_error"]) == (2, 2, "torch.AcceleratorError: CUDA error: invalid argument")
    assert second["not_run"] == "deadline reached"
    row = diag["summary"]["cascade"]["0.3.75"]
    assert row[jobs[0].variant] == "fail: test_b" and row[jobs[1].variant] == "not run"


def test_the_pool_runs_jobs_within_their_limits(tmp_path):
    check = gpu_check.Check.__new__(gpu_check.Check)
    check.opts = gpu_check.argparse.Namespace(out=str(tmp_path))
    check.work, check.env, check.deadline = str(tmp_path), dict(gpu_check.os.environ), gpu_check.time.monotonic() + 60
    check.result = {"stages": []}
    open(tmp_path / "gpu_check.log", "w").close()
    python = gpu_check.sys.executable
    done = check.run_pool([("quick", [python, "-c", "print('ok')"], None, 10),
                           ("slow", [python, "-c", "import time; time.sleep(30)"], None, 1)], parallel=2)
    assert done["quick"]["returncode"] == 0 and done["slow"]["timed_out"]
