"""The graph-editor templates match the API example (with each template's inputs), node for node,
on a real server."""
import json

import pytest

from ui_workflow import TEMPLATES, template_path, template_prompt, to_api, to_ui

pytestmark = pytest.mark.server

# The templates are made on ComfyUI 0.3.75, whose SaveImage has no output; from 0.33.0 on it also
# outputs its images, and the editor shows that output on the node.
UPSTREAM = (0, 33, 0)
SAVE_IMAGE_OUTPUTS_UPSTREAM = [{"name": "images", "type": "IMAGE", "links": [], "slot_index": 0}]


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def template_as_saved_here(comfyui_version):
    """The committed template of a title as the editor of the ComfyUI under test saves it."""
    def expected(title: str) -> dict:
        workflow = load(template_path(title))
        if comfyui_version >= UPSTREAM:
            for node in workflow["nodes"]:
                if node["type"] == "SaveImage":
                    assert node["outputs"] == [], "the template already has SaveImage's output"
                    node["outputs"] = SAVE_IMAGE_OUTPUTS_UPSTREAM
        return workflow
    return expected


@pytest.mark.parametrize("title", TEMPLATES)
def test_the_editor_workflow_is_the_api_workflow(object_info, title):
    assert to_api(load(template_path(title)), object_info) == template_prompt(title)


@pytest.mark.parametrize("title", TEMPLATES)
def test_the_editor_workflow_is_up_to_date_with_the_nodes(object_info, template_as_saved_here, title):
    """Regenerate with `python scripts/ui_workflow.py OBJECT_INFO.json` (on 0.3.75) when a node's inputs change."""
    assert template_as_saved_here(title) == to_ui(template_prompt(title), object_info)
