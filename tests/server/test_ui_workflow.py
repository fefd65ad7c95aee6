"""The graph-editor example workflow matches the API example, node for node, on a real server."""
import json
import os

import pytest

from comfy_server import REPO
from server_helpers import WORKFLOW
from ui_workflow import to_api, to_ui

pytestmark = pytest.mark.server

UI_WORKFLOW = os.path.join(REPO, "example_workflows", "streamloader_sd15.json")


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_the_editor_workflow_is_the_api_workflow(object_info):
    assert to_api(load(UI_WORKFLOW), object_info) == load(WORKFLOW)


def test_the_editor_workflow_is_up_to_date_with_the_nodes(object_info):
    """Regenerate with `python scripts/ui_workflow.py` when a node's inputs change."""
    assert load(UI_WORKFLOW) == to_ui(load(WORKFLOW), object_info)
