"""A person's actions in ComfyUI's graph editor, as playwright steps that work on the frontend
of ComfyUI 0.3.75 (1.32.9) and of upstream 0.33.0."""
from __future__ import annotations

import os

from comfy_server import PACK_DIR_NAME, REPO
from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(REPO, "out", "browser")
RUN_TIMEOUT_MS = 180_000


def open_editor(page, url: str, nodes_2: bool = False) -> None:
    page.goto(url)
    page.wait_for_function("window.app?.graph && window.app.extensionManager?.setting")
    page.evaluate("v => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', v)", nodes_2)


def open_template(page, title: str) -> None:
    """From the Templates dialog (a new user of 1.32.9 sees it at once; else the menu's command
    opens it): the pack's entry under Extensions, then the template's card."""
    pack = page.get_by_text(PACK_DIR_NAME, exact=True).first
    try:
        pack.wait_for(timeout=5_000)
    except PlaywrightTimeout:
        page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    pack.click()
    page.get_by_text(title, exact=True).first.click()
    page.wait_for_function("t => app.extensionManager.workflow.activeWorkflow?.filename === t", arg=title)


def run(page) -> None:
    """Press Run and wait for the Save Image node's preview."""
    page.get_by_role("button", name="Run", exact=True).first.click()
    page.wait_for_function("Object.values(app.nodeOutputs ?? {}).some(o => o.images?.length)", timeout=RUN_TIMEOUT_MS)


def node_figures(page) -> dict[str, list[dict]]:
    """Each node type's figure lines as shown on the node: {type: [{text, note, color}]}."""
    page.wait_for_function("document.querySelectorAll('.streamloader-figures[data-node-id]').length >= 3")
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.streamloader-figures[data-node-id]')]
        .map(el => [app.graph.getNodeById(Number(el.dataset.nodeId)).type,
                    [...el.children].map(d => ({text: d.innerText, note: d.classList.contains('streamloader-note'),
                                                 color: getComputedStyle(d).color, visible: d.checkVisibility()}))]))""")


def open_panel(page) -> None:
    page.evaluate("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.streamloader')")
    page.wait_for_selector(".streamloader-panel .streamloader-body h4")


def panel_models(page) -> list[dict]:
    return page.evaluate("""() => [...document.querySelectorAll('.streamloader-model')].map(m => ({
        title: m.querySelector('h4').innerText, text: m.innerText,
        cells: Object.fromEntries(['resident', 'streamed', 'ring'].map(k => [k, m.querySelectorAll('.cell.' + k).length]))}))""")


def release(page) -> None:
    page.locator(".streamloader-release").click()
    page.wait_for_selector(".streamloader-empty")


def screenshot(page, name: str) -> str:
    page.wait_for_timeout(1500)  # the preview image and the canvas settle after the run's last message
    path = os.path.join(ARTIFACTS, f"{name}.png")
    page.screenshot(path=path)
    return path
