"""The graph-editor templates match the API example (with each template's inputs), node for node,
on a real server."""
import json

import pytest

from ui_workflow import TEMPLATES, template_path, template_prompt, to_api, to_ui

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("title", TEMPLATES)
def test_the_editor_workflow_is_the_api_workflow(object_info, title):
    assert to_api(load(template_path(title)), object_info) == template_prompt(title)


@pytest.mark.parametrize("title", TEMPLATES)
def test_the_editor_workflow_is_up_to_date_with_the_nodes(object_info, title):
    """Regenerate with `python scripts/ui_workflow.py OBJECT_INFO.json` when a node's inputs change."""
    assert load(template_path(title)) == to_ui(template_prompt(title), object_info)
