"""A person's path in the graph editor, in headless chromium against a real ComfyUI server: open
each example from the Templates dialog, press Run, read the figures on the nodes, open the
StreamLoader tab, see the model (and, streamed, its residency strip), press Release, see it empty."""
import os
import re

import pytest
from PIL import Image, ImageChops, ImageStat

from browser_helpers import (ARTIFACTS, node_figures, open_editor, open_panel, open_template, panel_models,
                             release, run, screenshot)
from comfy_server import REPO

pytestmark = pytest.mark.browser

PLAIN, STREAMED = "StreamLoader SD1.5", "StreamLoader SD1.5 streamed"
WARNING_COLOR = "rgb(240, 160, 32)"


def produced_image(server, page) -> str:
    (image,) = page.evaluate("Object.values(app.nodeOutputs).find(o => o.images?.length).images")
    return server.output_path(image)


def assert_thumbnail_is(path: str, title: str) -> None:
    """The template's thumbnail is this run's image, upscaled nearest (a JPEG: within a few levels)."""
    with Image.open(path) as produced, Image.open(os.path.join(REPO, "example_workflows", f"{title}.jpg")) as thumb:
        upscaled = produced.convert("RGB").resize(thumb.size, Image.NEAREST)
        upscaled.save(os.path.join(ARTIFACTS, f"{title} thumbnail.png"))
        mean_difference = sum(ImageStat.Stat(ImageChops.difference(upscaled, thumb.convert("RGB"))).mean) / 3
    assert mean_difference < 4, f"the thumbnail of {title!r} is not the image the workflow produces"


def assert_figures(figures: dict, streamed: bool) -> None:
    loader, sampler, decode = (figures[t] for t in ("StreamLoaderCheckpoint", "StreamLoaderKSampler",
                                                     "StreamLoaderVAEDecode"))
    assert all(line["visible"] for lines in figures.values() for line in lines)
    assert loader[0]["text"].startswith("held:") and "GiB in RAM" in loader[0]["text"]
    for lines in (sampler, decode):
        assert lines[0]["text"].startswith("disk read:") and "MiB" in lines[0]["text"] and lines[0]["text"].endswith(" s")
    assert any(line["text"].startswith("streamed (simulated device)") for line in sampler) == streamed
    notes = [line for line in loader if line["note"]]
    assert [n["text"].startswith("`stream_layers` runs on a simulated device") for n in notes] == ([True] if streamed else [])
    assert all(n["color"] == WARNING_COLOR for n in notes)


@pytest.mark.parametrize("title,nodes_2", [(PLAIN, False), (STREAMED, False), (PLAIN, True)],
                         ids=["plain", "streamed", "plain-nodes-2.0"])
def test_a_template_runs_and_shows_its_figures_and_the_panel(editor_server, comfyui_version, page, title, nodes_2):
    name = f"comfyui-{'.'.join(map(str, comfyui_version))}-{title.replace(' ', '-')}" + ("-nodes-2.0" if nodes_2 else "")
    open_editor(page, editor_server.url, nodes_2)
    open_template(page, title)
    run(page)
    assert_figures(node_figures(page), streamed=title == STREAMED)
    screenshot(page, f"{name}-nodes")
    assert_thumbnail_is(produced_image(editor_server, page), title)

    open_panel(page)
    (model,) = panel_models(page)
    assert model["title"] == "tiny_sd15.safetensors (checkpoint)"
    assert "in RAM" in model["text"] and "MiB" in model["text"]
    cells = model["cells"]
    if title == STREAMED:
        assert cells["resident"] + cells["streamed"] == 5 and cells["streamed"] >= 3 and cells["ring"] >= 1
        assert re.search(r"engine host\s*\d+\.\d{3} s", model["text"]), model["text"]
    else:
        assert cells == {"resident": 0, "streamed": 0, "ring": 0}
    screenshot(page, f"{name}-panel")
    release(page)
    assert panel_models(page) == []
