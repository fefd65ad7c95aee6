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
