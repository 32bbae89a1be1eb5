// comfyui-dmd2 in the ComfyUI frontend: nodes' notes shown in full, widgets that follow the preset.
//
// DMD2 Generate returns its warnings (a preset of another release family, a step count the
// release was not distilled for) as the "text" output of every run, an empty list when there
// is nothing to say; DMD2 Train LoRA returns where its LoRA and run folder are. Each run
// replaces the note below the node's widgets, sized to the whole text (stock progress text is
// cut to two lines and is never cleared), or removes it; the note is also shown as a toast.
// While training, the node's status (resuming at step N, it/s, time left) is stock progress
// text; the run's note replaces it. A stopped run's 'dmd2.toast' event says where its
// checkpoint is and that running again resumes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NOTE = "dmd2_note";
const PROGRESS_TEXT = "$$node-text-preview";  // the stock progress text widget
// node type -> toast severity of its note
const NOTED = { DMD2Generate: "warn", DMD2TrainLoRA: "success" };
const LINE_HEIGHT = 16;
const PADDING = 10;

function noteWidget(node) {
  return node.widgets?.find((w) => w.name === NOTE);
}

function removeWidget(node, name) {
  const index = node.widgets?.findIndex((w) => w.name === name) ?? -1;
  if (index < 0) return false;
  node.widgets[index].onRemove?.();
  node.widgets.splice(index, 1);
  return true;
}

function addNote(node, warn) {
  const element = document.createElement("div");
  element.className = "dmd2-note";
  Object.assign(element.style, {
    whiteSpace: "pre-wrap", overflowWrap: "anywhere", overflowY: "auto", boxSizing: "border-box",
    font: `12px/${LINE_HEIGHT}px sans-serif`, padding: "4px 6px", borderRadius: "4px",
    color: warn ? "#ffd27a" : "var(--input-text, #ddd)",
    background: warn ? "rgba(120, 80, 0, 0.35)" : "var(--comfy-input-bg, #222)",
  });
  const widget = node.addDOMWidget(NOTE, "dmd2_note", element, {
    serialize: false,
    getValue: () => element.textContent,
    setValue: (value) => { element.textContent = value; },
    // The whole text: its rendered height once laid out, else an estimate from its length.
    getMinHeight: () => {
      const width = Math.max(80, (node.size?.[0] ?? 300) - 30);
      const estimate = element.textContent.split("\n")
        .reduce((lines, line) => lines + Math.max(1, Math.ceil((line.length * 6.5) / width)), 0);
      return Math.max(element.scrollHeight ? Math.min(element.scrollHeight, 400) : 0,
                      estimate * LINE_HEIGHT + PADDING);
    },
  });
  widget.serialize = false;
  return widget;
}

function fit(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

export function showNote(node, lines, severity) {
  const text = (lines ?? []).filter((line) => line).join("\n");
  const removed = removeWidget(node, PROGRESS_TEXT);
  if (!text) {
    if (removeWidget(node, NOTE) || removed) fit(node);
    return;
  }
  const widget = noteWidget(node) ?? addNote(node, severity === "warn");
  widget.value = text;
  fit(node);
  requestAnimationFrame(() => fit(node));  // again at the laid-out height
  if (severity) {
    app.extensionManager?.toast?.add({
      severity, summary: node.title || node.type, detail: text, life: 15000,
    });
  }
}

// Widgets used only with some settings: greyed out (value hidden, not editable) otherwise, so
// that e.g. a custom timestep list beside a named preset does not read as what is sampled.
const ONLY_WHEN = {
  custom_timesteps: (value) => value("preset") === "custom",
  custom_rule: (value) => value("preset") === "custom",
  gamma: (value) => value("preset") === "custom" && value("custom_rule") === "tcd",
};

export function updateEnabled(node) {
  const value = (name) => node.widgets?.find((w) => w.name === name)?.value;
  if (value("preset") === undefined) return;
  for (const widget of node.widgets ?? []) {
    if (widget.name in ONLY_WHEN) widget.disabled = !ONLY_WHEN[widget.name](value);
  }
  node.setDirtyCanvas?.(true, false);
}

function followPreset(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    for (const widget of this.widgets ?? []) {
      if (widget.name !== "preset" && widget.name !== "custom_rule") continue;
      const callback = widget.callback;
      const node = this;
      widget.callback = function () {
        const out = callback?.apply(this, arguments);
        updateEnabled(node);
        return out;
      };
    }
    updateEnabled(this);
    return result;
  };
  const onConfigure = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    updateEnabled(this);  // the saved values are in place
    return result;
  };
}

app.registerExtension({
  name: "comfyui-dmd2",
  setup() {
    api.addEventListener("dmd2.toast", ({ detail }) => {
      app.extensionManager?.toast?.add({ ...detail, life: 20000 });
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    const inputs = { ...nodeData.input?.required, ...nodeData.input?.optional };
    if (nodeData.name.startsWith("DMD2") && "preset" in inputs) followPreset(nodeType);
    if (!(nodeData.name in NOTED)) return;
    const severity = NOTED[nodeData.name];
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      showNote(this, output?.text, severity);
    };
  },
});
