// The StreamLoader extension for ComfyUI's graph editor: figures on the pack's nodes and a
// "StreamLoader" sidebar tab. Written against the frontend's public extension API only
// (registerExtension, beforeRegisterNodeDef, addDOMWidget, extensionManager.registerSidebarTab).
import { app } from "../../scripts/app.js";
import { withFigures } from "./figures.js";
import { Panel } from "./panel.js";

const STYLE = `
.streamloader-figures { font: 12px/17px monospace; color: var(--input-text, #ddd); white-space: pre-wrap;
  overflow-wrap: anywhere; padding: 4px 6px; user-select: text; pointer-events: auto; }
.streamloader-note { color: #f0a020; }
.streamloader-panel { padding: 8px 12px; font-size: 13px; }
.streamloader-panel h4 { margin: 10px 0 4px; }
.streamloader-rows th { text-align: left; font-weight: normal; opacity: 0.7; padding-right: 10px; }
.streamloader-model { border-top: 1px solid var(--border-color, #444); padding: 4px 0; }
.streamloader-strip { display: flex; flex-wrap: wrap; gap: 2px; margin: 6px 0; }
.streamloader-strip .cell { width: 12px; height: 12px; border-radius: 2px; }
.streamloader-strip .resident { background: #3c9a5f; }
.streamloader-strip .streamed { background: #4a78c2; }
.streamloader-strip .ring { background: #d08a2c; }
.streamloader-release { margin: 4px 0; padding: 2px 12px; cursor: pointer; }
`;

app.registerExtension({
  name: "StreamLoader",
  async setup() {
    document.head.append(Object.assign(document.createElement("style"), { textContent: STYLE }));
    const panel = new Panel();
    app.extensionManager.registerSidebarTab({
      id: "streamloader",
      icon: "pi pi-database",
      title: "StreamLoader",
      tooltip: "StreamLoader: models held, bytes, streaming",
      type: "custom",
      render: (container) => panel.mount(container),
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name.startsWith("StreamLoader")) withFigures(nodeType);
  },
});
