"""API-format workflows to the graph editor's workflow format and back, with a server's /object_info.

The graph editor saves and opens workflows as nodes (with their widget values in the order
of the node's inputs) and links; the API format names every input. The widget order comes
from /object_info, so a conversion matches the nodes exactly as the server defines them.

    python scripts/ui_workflow.py OBJECT_INFO.json

writes every template of example_workflows/ (what the editor's Templates dialog lists, titled by
file name) from the API example in api_workflows/, with its changed inputs (TEMPLATES);
tests/server/test_ui_workflow.py checks that they stay in step.
"""
from __future__ import annotations

import copy
import json
import os
import sys

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_HEIGHT, NODE_SIZE = 360, 340, [320, 200]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_EXAMPLE = os.path.join(REPO, "api_workflows", "streamloader_sd15_api.json")
# title -> {node id: inputs changed from the API example}. 0.07 GiB holds the tiny UNet's weights
# outside its blocks, a ring of two block slots and its smallest block: the four others stream.
TEMPLATES = {
    "StreamLoader SD1.5": {},
    "StreamLoader SD1.5 streamed": {"1": {"stream_layers": True, "max_vram_gb": 0.07}},
}


def declared_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's required then optional inputs, in the server's order."""
    order = info.get("input_order", {})
    return [(name, info["input"][group][name]) for group in ("required", "optional") for name in order.get(group, [])]


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def control_after_generate(spec: list) -> bool:
    """Seeds carry a second widget value in the editor: what to do with the seed after a run."""
    return len(spec) > 1 and bool(spec[1].get("control_after_generate"))


def to_ui(prompt: dict, object_info: dict) -> dict:
    ids = sorted(prompt, key=int)
    links, nodes = [], {}
    for order, node_id in enumerate(ids):
        node, info = prompt[node_id], object_info[prompt[node_id]["class_type"]]
        inputs, widgets = [], []
        for name, spec in declared_inputs(info):
            value = node["inputs"].get(name)
            if is_widget(spec):
                widgets += [value, "fixed"] if control_after_generate(spec) else [value]
            else:
                link = None
                if value is not None:
                    link = len(links) + 1
                    links.append([link, int(value[0]), value[1], int(node_id), len(inputs), spec[0]])
                inputs.append({"name": name, "type": spec[0], "link": link})
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": slot}
                   for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        nodes[int(node_id)] = {
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0], "size": list(NODE_SIZE), "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
    for link, origin, slot, _, _, _ in links:
        nodes[origin]["outputs"][slot]["links"].append(link)
    _lay_out(nodes, links)
    return {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": list(nodes.values()),
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _lay_out(nodes: dict, links: list) -> None:
    """Columns by depth (the longest chain of links before a node), rows in id order."""
    depth = {node_id: 0 for node_id in nodes}
    for _ in nodes:
        for _, origin, _, target, _, _ in links:
            depth[target] = max(depth[target], depth[origin] + 1)
    rows: dict[int, int] = {}
    for node_id in sorted(nodes):
        column = depth[node_id]
        nodes[node_id]["pos"] = [50 + column * COLUMN_WIDTH, 50 + rows.get(column, 0) * ROW_HEIGHT]
        rows[column] = rows.get(column, 0) + 1


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        linked = {i["name"]: i["link"] for i in node["inputs"]}
        values = iter(node["widgets_values"])
        inputs = {}
        for name, spec in declared_inputs(object_info[node["type"]]):
            if is_widget(spec):
                inputs[name] = next(values)
                if control_after_generate(spec):
                    next(values)
            elif linked.get(name) is not None:
                _, origin, slot, _, _, _ = links[linked[name]]
                inputs[name] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def template_prompt(title: str) -> dict:
    """The API-format prompt of a template: the API example with the template's inputs."""
    with open(API_EXAMPLE) as f:
        prompt = json.load(f)
    for node_id, inputs in TEMPLATES[title].items():
        prompt[node_id]["inputs"].update(copy.deepcopy(inputs))
    return prompt


def template_path(title: str) -> str:
    return os.path.join(REPO, "example_workflows", f"{title}.json")


def main(object_info_path: str) -> None:
    with open(object_info_path) as f:
        object_info = json.load(f)
    for title in TEMPLATES:
        with open(template_path(title), "w") as f:
            json.dump(to_ui(template_prompt(title), object_info), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
