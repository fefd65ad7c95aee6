"""A pytest plugin for `make gpu-check`: past the time in STREAMLOADER_TEST_DEADLINE (seconds since
the epoch), no further test starts; pytest ends as after `-x`, and its report holds what ran.
Load with `-p pytest_deadline` (scripts/ on PYTHONPATH)."""
import os
import time

DEADLINE_ENV = "STREAMLOADER_TEST_DEADLINE"


def pytest_runtest_teardown(item, nextitem):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and nextitem is not None and time.time() > float(deadline):
        item.session.shouldstop = f"{DEADLINE_ENV} reached: the tests after {item.nodeid} did not run"
