// The StreamLoader sidebar tab: what the ModelManager holds (GET /streamloader/stats), a
// residency strip per streamed model, the process totals and a Release button
// (POST /streamloader/release). It refreshes when a run ends, the queue changes or the server
// publishes new stats (the streamloader.stats event), never on a timer.
import { api } from "../../scripts/api.js";

const MIB = 1024 ** 2;
const GIB = 1024 ** 3;

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "no cap";
  return bytes >= GIB ? `${(bytes / GIB).toFixed(2)} GiB` : `${(bytes / MIB).toFixed(1)} MiB`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function rows(pairs) {
  const table = el("table", "streamloader-rows");
  for (const [label, value] of pairs) {
    const tr = table.insertRow();
    tr.append(el("th", "", label), el("td", "", value));
  }
  return table;
}

// One cell per streaming unit: the resident ones, the streamed ones, then the ring's slots.
function strip(stream) {
  const cells = el("div", "streamloader-strip");
  const add = (count, kind, title) => {
    for (let i = 0; i < count; i++) cells.append(Object.assign(el("span", `cell ${kind}`), { title }));
  };
  add(stream.resident_units, "resident", "resident on the device");
  add(stream.streamed_units, "streamed", "streamed every step");
  add(stream.slots, "ring", "ring slot");
  return cells;
}

function streamFigures(stream) {
  const overlap = stream.overlap_efficiency === null ? "n/a" : `${Math.round(stream.overlap_efficiency * 100)} %`;
  return rows([
    ["last run", `${stream.steps} steps on the ${stream.device} device`],
    ["units", `${stream.resident_units} resident, ${stream.streamed_units} streamed, ring of ${stream.slots}`],
    ["copies", `${stream.copy_seconds.toFixed(3)} s, stalled ${stream.stall_seconds.toFixed(3)} s`],
    ["engine host", `${stream.host_seconds.toFixed(3)} s`],
    ["overlap", overlap],
    ["peak", `${formatBytes(stream.peak_device_bytes)} of ${formatBytes(stream.budget_bytes)}`],
  ]);
}

function modelCard(model) {
  const card = el("section", "streamloader-model");
  card.append(el("h4", "", `${model.path.split(/[\\/]/).pop()} (${model.kind})`));
  card.append(rows([
    ["file", formatBytes(model.bytes)],
    ["in RAM", formatBytes(model.host_resident_bytes)],
    ["on the device", formatBytes(model.vram_resident_bytes)],
    ["streamed", model.stream ? formatBytes(model.stream.streamed_bytes) : "—"],
    ["budget", formatBytes(model.budget_bytes ?? model.stream?.budget_bytes)],
  ]));
  if (model.stream && model.stream.steps > 0) {
    card.append(strip(model.stream), streamFigures(model.stream));
    for (const note of model.stream.notes) card.append(el("div", "streamloader-note", note));
  }
  return card;
}

function totals(stats) {
  return rows([
    ["read from disk", formatBytes(stats.disk_bytes_read)],
    ["host to device", formatBytes(stats.h2d_bytes)],
    ["pinned", `${formatBytes(stats.pinned_bytes)} of ${formatBytes(stats.pinned_cap_bytes)}`],
    ["RAM held", `${formatBytes(stats.held_host_bytes)} of ${formatBytes(stats.ram_budget_bytes)}`],
  ]);
}

export class Panel {
  constructor() {
    this.root = el("div", "streamloader-panel");
    this.body = el("div", "streamloader-body");
    const release = el("button", "streamloader-release", "Release");
    release.title = "Drop every model StreamLoader holds (POST /streamloader/release)";
    release.onclick = () => this.release();
    this.root.append(el("h3", "", "StreamLoader"), release, this.body);
    // streamloader.stats: the worker published the snapshot of a run that just ended.
    for (const event of ["execution_success", "execution_error", "execution_interrupted", "status",
                         "streamloader.stats"]) {
      api.addEventListener(event, () => this.refresh());
    }
  }

  mount(container) {
    container.replaceChildren(this.root);
    return this.load();
  }

  // The server applies a release between prompts; when it answers with an id, wait (bounded)
  // until its stats list that release as applied.
  async release() {
    const answer = await (await api.fetchApi("/streamloader/release", { method: "POST" })).json();
    for (let tries = 0; tries < 40; tries++) {
      const stats = await this.load();
      if (answer.id === undefined || stats.releases?.applied?.some((r) => r.id === answer.id)) return;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }

  // After a run or a queue change; skipped while the tab is closed (opening it loads).
  refresh() {
    return this.root.isConnected ? this.load() : undefined;
  }

  async load() {
    const response = await api.fetchApi("/streamloader/stats", { cache: "no-store" });
    const stats = await response.json();
    const models = stats.models.length
      ? stats.models.map(modelCard)
      : [el("p", "streamloader-empty", "No model held.")];
    this.body.replaceChildren(el("h4", "", "Models"), ...models, el("h4", "", "Process"), totals(stats));
    return stats;
  }
}
