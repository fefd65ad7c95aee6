// Figures on the nodes: after a run, each StreamLoader node shows the `text` lines it returned
// (bytes read from disk, host-to-device bytes, seconds, streaming figures) as read-only text on
// the node, and the lines it also lists under `notes` in a warning colour. The text lives in a DOM
// widget, which the classic canvas places over the node and Nodes 2.0 mounts inside it.
import { app } from "../../scripts/app.js";

const WIDGET = "streamloader_figures";

function addFiguresWidget(node) {
  const element = document.createElement("div");
  element.className = "streamloader-figures";
  node.addDOMWidget(WIDGET, "streamloader-figures", element, {
    serialize: false,
    getValue: () => element.textContent,
    setValue: () => {},
    // Long lines wrap: the rendered height, once there is one, else a line each.
    getMinHeight: () => Math.max(element.scrollHeight, element.childElementCount * 17) + 8,
  });
}

function line(text, isNote) {
  const div = document.createElement("div");
  div.textContent = text;
  if (isNote) div.className = "streamloader-note";
  return div;
}

function showFigures(node, output) {
  const widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget || !output?.text) return;
  const notes = new Set(output.notes ?? []);
  widget.element.dataset.nodeId = String(node.id);
  widget.element.replaceChildren(...output.text.map((text) => line(text, notes.has(text))));
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  app.graph.setDirtyCanvas(true, true);
}

export function withFigures(nodeType) {
  const created = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = created?.apply(this, arguments);
    addFiguresWidget(this);
    return result;
  };
  const executed = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    executed?.apply(this, arguments);
    showFigures(this, output);
  };
}
