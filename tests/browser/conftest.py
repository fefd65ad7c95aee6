"""Fixtures of the browser tests: a real ComfyUI server with the pack, and Debian's chromium
driven by playwright (from the cached folder `make test` names in BROWSER_LIBS)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # browser_helpers
if os.environ.get("BROWSER_LIBS"):
    sys.path.insert(0, os.environ["BROWSER_LIBS"])

from browser_helpers import ARTIFACTS, CHROMIUM_ARGS  # noqa: E402 (after the path above)
from comfy_server import ComfyServer  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402


@pytest.fixture(scope="session")
def editor_server(comfy_path, models_dir):
    """On the CPU everywhere: the tests read the simulated device's figures; the editor's side is
    the same on a GPU."""
    with ComfyServer(comfy_path, models_dir, cpu=True) as server:
        yield server


@pytest.fixture(scope="session")
def chromium():
    executable = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(executable):
        pytest.fail(f"no chromium at {executable}; `make test` installs Debian's (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    """A fresh browser profile (a new user) at 1400x900; saved screenshots go to out/browser/."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()
