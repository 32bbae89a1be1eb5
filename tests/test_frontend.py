"""The shipped UI workflows (workflows/*.json) in the real ComfyUI frontend, in headless
Chromium: each graph loads with no missing node types and every widget value accepted, and
the frontend's own ``app.graphToPrompt()`` produces the API twin shipped in workflows/api/.

The page is the frontend package the test server serves at /, driven over the Chrome
DevTools Protocol (tests/browser.py). With DMD2_WRITE_SCREENSHOTS=1 the loaded graphs are
also saved as docs/images/<workflow>.png for the README, and as workflows/<workflow>.jpg
thumbnails for the template browser (tests/thumbnails.py).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("websocket", reason="websocket-client not installed (the test extras bring it via comfy-cli)")
from browser import Chromium, find_chromium
from thumbnails import write_thumbnail

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
API = WORKFLOWS / "api"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
IMAGES = REPO / "docs" / "images"
CHROMIUM = find_chromium()
WRITE_SCREENSHOTS = os.environ.get("DMD2_WRITE_SCREENSHOTS", "") not in ("", "0")

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: set $CHROMIUM or install it "
                       "(Debian: apt-get install chromium; scripts/setup-test-env.sh does this as root)"),
]

# Base checkpoints the workflows name -> the tiny checkpoint standing in for it.
def load(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the page ---------------------------------------------------------------------------------

APP_READY = """(() => {
  const app = window.app;
  return !!(window.comfyAPI && app && app.vueAppReady && app.graph && app.canvas && app.extensionManager
            && app.extensionManager.workflow && app.extensionManager.workflow.activeWorkflow)
})()"""

# Settings that keep a fresh profile's first-run UI (template browser) out of the way, and
# ones that make the screenshots show the graph alone and legibly.
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True}
SCREENSHOT_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                       "Comfy.Graph.CanvasMenu": False, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}


@pytest.fixture(scope="module")
def page(workflow_files):
    """One headless Chromium for the module, on the server's frontend, app ready."""
    server = workflow_files
    request = urllib.request.Request(server.url + "/settings", data=json.dumps(FIRST_RUN_SETTINGS).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    browser = Chromium.launch(CHROMIUM, width=1400, height=900)
    try:
        # The "Nodes 2.0" banner is dismissed in localStorage, before any page script runs.
        browser.send("Page.addScriptToEvaluateOnNewDocument",
                     {"source": "try { localStorage.setItem('vueNodesBannerDismissed', 'true') } catch (e) {}"})
        browser.navigate(server.url + "/")
        browser.wait_for(APP_READY, timeout=90)
        browser.startup_errors = browser.page_errors()
        yield browser
    finally:
        browser.close()


# Load a workflow the way the UI does (app.loadGraphData), catching the frontend's own
# missing-node report, then describe what the frontend made of it and convert it with
# app.graphToPrompt(). Runs as one script so nothing can interleave.
LOAD_AND_CONVERT = """(async (workflow, name) => {
  const app = window.app;
  const missing = [];
  const report = app.showMissingNodesError;
  app.showMissingNodesError = (types) => { missing.push(...types.map(t => typeof t === 'string' ? t : t.type)); };
  try {
    await app.loadGraphData(workflow, true, true, name, {showMissingModelsDialog: false});
  } finally {
    app.showMissingNodesError = report;
  }
  const nodes = app.graph.nodes.map(n => ({
    id: n.id, type: n.type,
    registered: Object.prototype.hasOwnProperty.call(LiteGraph.registered_node_types, n.type),
    comfyClass: n.comfyClass ?? null,
    virtual: !!n.isVirtualNode,
    hasErrors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => {
      let values = w.options ? w.options.values : undefined;
      if (typeof values === 'function') values = values(w, n);
      return {name: w.name, type: w.type, value: w.value ?? null,
              options: Array.isArray(values) ? values : null,
              min: w.options?.min ?? null, max: w.options?.max ?? null};
    }),
  }));
  const saved = app.graph.serialize();
  const prompt = await app.graphToPrompt();
  return {missing, nodes,
          saved: {nodes: saved.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? null,
                                                 pos: n.pos, size: n.size})),
                  links: saved.links},
          output: prompt.output,
          titleHeight: LiteGraph.NODE_TITLE_HEIGHT};
})"""


def load_in_frontend(browser: Chromium, workflow: dict, name: str) -> dict:
    errors_before = len(browser.page_errors())
    result = browser.evaluate(f"{LOAD_AND_CONVERT}({json.dumps(workflow)}, {json.dumps(name)})")
    result["page_errors"] = browser.page_errors()[errors_before:]
    return result


def problems_loading(result: dict) -> list[str]:
    """Everything the frontend did not accept: missing or unregistered node types, nodes
    without a server definition (frontend-only nodes such as notes excepted), nodes it
    flagged, combo values not among the options, numbers out of range, page errors."""
    problems = [f"frontend reports missing node type {t!r}" for t in result["missing"]]
    for node in result["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if not node["registered"]:
            problems.append(f"{where}: type not registered in LiteGraph")
        if not node["virtual"] and node["comfyClass"] != node["type"]:
            problems.append(f"{where}: no ComfyUI node definition (comfyClass {node['comfyClass']!r})")
        if node["hasErrors"]:
            problems.append(f"{where}: flagged has_errors by the frontend")
        for w in node["widgets"]:
            if w["type"] == "combo" and w["options"] is not None and w["value"] not in w["options"]:
                problems.append(f"{where}: {w['name']}={w['value']!r} not among {w['options'][:8]}")
            number = isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool)
            if number and (w["min"] is not None and w["value"] < w["min"] or w["max"] is not None and w["value"] > w["max"]):
                problems.append(f"{where}: {w['name']}={w['value']} outside [{w['min']}, {w['max']}]")
    problems += [f"page error while loading: {e[:500]}" for e in result["page_errors"]]
    return problems


def prompt_differences(frontend: dict, twin: dict) -> list[str]:
    """Exact differences between the frontend's prompt and the twin (node ids, class_type,
    inputs incl. links and widget values); metadata such as _meta is not compared."""
    diffs = []
    for node_id in sorted(set(frontend) | set(twin), key=lambda k: (len(k), k)):
        if node_id not in twin:
            diffs.append(f"node {node_id} ({frontend[node_id]['class_type']}): in the frontend's prompt, not in the twin")
            continue
        if node_id not in frontend:
            diffs.append(f"node {node_id} ({twin[node_id]['class_type']}): in the twin, not in the frontend's prompt")
            continue
        f, t = frontend[node_id], twin[node_id]
        if f["class_type"] != t["class_type"]:
            diffs.append(f"node {node_id}: class_type {f['class_type']!r} (frontend) != {t['class_type']!r} (twin)")
        for name in sorted(set(f["inputs"]) | set(t["inputs"])):
            fv, tv = f["inputs"].get(name, "<absent>"), t["inputs"].get(name, "<absent>")
            if not same_value(fv, tv):
                diffs.append(f"node {node_id} ({t['class_type']}).{name}: frontend {fv!r} != twin {tv!r}")
    return diffs


def same_value(a, b) -> bool:
    """Equal as JSON values. JavaScript has one number type (1.0 comes back as 1), so int and
    float compare by value; a bool is not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def overlapping_nodes(result: dict) -> list[str]:
    """Pairs of nodes whose boxes (title bar included) overlap as laid out in the frontend."""
    th = result["titleHeight"]
    boxes = [(n["id"], n["type"], n["pos"][0], n["pos"][1] - th, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in result["saved"]["nodes"]]
    pairs = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            w, h = min(a[4], b[4]) - max(a[2], b[2]), min(a[5], b[5]) - max(a[3], b[3])
            if w > 0 and h > 0:
                pairs.append(f"{a[0]}:{a[1]} and {b[0]}:{b[1]} overlap by {w:.0f}x{h:.0f}")
    return pairs


@pytest.fixture(scope="module")
def loaded(page):
    """Each workflow loaded once (lazily), then converted: {stem: result}."""
    cache = {}

    def get(path: Path) -> dict:
        if path.stem not in cache:
            cache[path.stem] = load_in_frontend(page, load(path), path.stem)
            if WRITE_SCREENSHOTS:
                write_screenshot(page, IMAGES / f"{path.stem}.png")
                write_thumbnail(IMAGES / f"{path.stem}.png", path.with_suffix(".jpg"))
        return cache[path.stem]

    return get


# -- the tests --------------------------------------------------------------------------------


def test_frontend_page_serves_this_pack(page):
    """The frontend in the page knows this pack's node types (from the server's /object_info)."""
    types = page.evaluate("Object.keys(LiteGraph.registered_node_types).filter(t => t.startsWith('DMD2'))")
    for node_type in ("DMD2Generate", "DMD2Schedule", "DMD2Sampler", "DMD2UNetLoader", "DMD2LoraLoader",
                      "DMD2ApplyT2IAdapter", "DMD2T2IAdapterLoader", "DMD2CannyEdgeMap"):
        assert node_type in types, f"{node_type} not registered in the frontend; page errors: {page.startup_errors}"


def test_missing_node_types_are_detected(page):
    """The check itself: a graph with an unknown node type is reported, not silently loaded."""
    workflow = load(WORKFLOWS / "sdxl_4step_unet.json")
    workflow["nodes"][1]["type"] = "DMD2NoSuchNode"
    result = load_in_frontend(page, workflow, "broken")
    assert "DMD2NoSuchNode" in result["missing"]
    assert any("DMD2NoSuchNode" in p for p in problems_loading(result))


def test_bad_combo_values_are_detected(page):
    """The check itself: a file name the server does not list is flagged."""
    workflow = load(WORKFLOWS / "sdxl_4step_unet.json")
    loader = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    loader["widgets_values"] = ["no_such_checkpoint.safetensors"]
    problems = problems_loading(load_in_frontend(page, workflow, "bad-combo"))
    assert any("no_such_checkpoint.safetensors" in p for p in problems), problems


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_loads_in_the_frontend(path, loaded):
    result = loaded(path)
    problems = problems_loading(result)
    assert not problems, "\n".join(problems)
    ui = load(path)
    assert sorted(n["id"] for n in result["saved"]["nodes"]) == sorted(n["id"] for n in ui["nodes"])
    # The frontend kept every widget value as saved (none replaced by a default or dropped) ...
    saved_values = {n["id"]: n["widgets_values"] for n in result["saved"]["nodes"]}
    for node in ui["nodes"]:
        assert saved_values[node["id"]] == node.get("widgets_values"), f"node {node['id']} ({node['type']})"
    # ... and every link.
    assert sorted(map(tuple, result["saved"]["links"])) == sorted(map(tuple, ui["links"]))


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_frontend_prompt_is_the_api_twin(path, loaded):
    result = loaded(path)
    twin = load(API / path.name)
    diffs = prompt_differences(result["output"], twin)
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_nodes_do_not_overlap_in_the_frontend(path, loaded):
    """At the sizes the frontend gives the nodes (at least what their widgets need), the
    saved layout keeps them apart: overlapping nodes hide each other's widgets."""
    pairs = overlapping_nodes(loaded(path))
    assert not pairs, "; ".join(pairs)


# -- screenshots ------------------------------------------------------------------------------

FIT_AND_DRAW = """(async () => {
  const app = window.app, th = LiteGraph.NODE_TITLE_HEIGHT;
  for (const b of document.querySelectorAll('.p-dialog-close-button')) b.click();
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.95});
  app.canvas.setDirty(true, true);
  const deadline = Date.now() + 5000;  // image previews (LoadImage) load asynchronously
  while (Date.now() < deadline && !app.graph.nodes.every(n => !n.imgs || n.imgs.every(i => i.complete))) {
    await new Promise(r => setTimeout(r, 100));
  }
  app.canvas.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return app.canvas.ds.scale;
})()"""


def write_screenshot(browser: Chromium, path: Path) -> None:
    if not getattr(browser, "screenshot_mode", False):
        settings = json.dumps(SCREENSHOT_SETTINGS)
        browser.evaluate(f"""(async () => {{
            const s = window.app.extensionManager.setting;
            for (const [k, v] of Object.entries({settings})) await s.set(k, v);
            await window.app.extensionManager.command.execute('Workspace.ToggleFocusMode');
        }})()""")
        browser.screenshot_mode = True
    browser.evaluate(FIT_AND_DRAW)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(browser.screenshot())


# -- the workflow dmd2-train exports --------------------------------------------------------


@pytest.mark.parametrize("timesteps", [(999, 749, 499, 249), (399,)], ids=["4-step", "1-step"])
def test_dmd2_train_workflow_loads_without_overlaps_and_converts_to_its_api_twin(page, timesteps):
    """workflow.json as ``dmd2-train`` writes it (checkpoint -> stock LoraLoaderModelOnly ->
    DMD2Generate -> decode -> save): every node and value accepted, no two nodes overlapping,
    and the frontend's prompt is exactly the workflow_api.json written beside it."""
    from comfyui_dmd2.training.cli import workflow_api, workflow_ui

    checkpoint, lora = "sd_xl_base_1.0.safetensors", "dmd2_sdxl_4step_lora_fp16.safetensors"  # files the server lists
    prompt = "a photo of a red fox in the snow, detailed fur"
    result = load_in_frontend(page, workflow_ui(checkpoint, lora, prompt, 1024, timesteps), f"dmd2_train_{len(timesteps)}")
    problems = problems_loading(result)
    assert not problems, "\n".join(problems)
    pairs = overlapping_nodes(result)
    assert not pairs, "; ".join(pairs)
    diffs = prompt_differences(result["output"], workflow_api(checkpoint, lora, prompt, 1024, timesteps))
    assert not diffs, "\n".join(diffs)


# -- running graphs from the frontend ----------------------------------------------------------

# Set widget values ([node id, widget name, value] ...), queue the graph as the Run button does
# and wait for the prompt's end (success, error or interrupt) as the frontend receives it.
QUEUE_AND_WAIT = """(async (changes, interruptAt) => {
  const app = window.app, api = window.comfyAPI.api.api;
  for (const b of document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')) b.click();
  for (const [id, name, value] of changes) {
    app.graph.getNodeById(id).widgets.find(w => w.name === name).value = value;
  }
  const texts = [];
  const onText = (e) => texts.push(e.detail);
  // Cancel (as the UI's button does) once a node's progress reaches a value: [node id, value]
  const onProgress = (e) => {
    if (interruptAt && e.detail.node == interruptAt[0] && e.detail.value >= interruptAt[1]) {
      api.removeEventListener('progress', onProgress);
      api.interrupt();
    }
  };
  api.addEventListener('progress_text', onText);
  api.addEventListener('progress', onProgress);
  const ends = ['execution_success', 'execution_error', 'execution_interrupted'];
  const finished = new Promise(resolve => {
    const handler = (e) => { for (const t of ends) api.removeEventListener(t, handler); resolve({type: e.type, detail: e.detail}); };
    for (const t of ends) api.addEventListener(t, handler);
  });
  await app.queuePrompt(0, 1);
  const result = await finished;
  await new Promise(r => setTimeout(r, 300));
  api.removeEventListener('progress_text', onText);
  api.removeEventListener('progress', onProgress);
  return {...result, progressTexts: texts};
})"""

# What a user sees of a node's note: the note widget's element, on screen at zoom 1.
NOTE_ON_SCREEN = """(async (id) => {
  const app = window.app, node = app.graph.getNodeById(id);
  app.canvas.ds.scale = 1;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => requestAnimationFrame(r))));
  const widgets = (node.widgets || []).map(w => w.name);
  const widget = (node.widgets || []).find(w => w.name === 'dmd2_note');
  const toasts = [...document.querySelectorAll('.p-toast-message')].map(e => e.innerText);
  const dialogs = [...document.querySelectorAll('.p-dialog')].map(e => e.innerText);
  if (!widget) return {widgets, note: null, toasts, dialogs};
  const el = widget.element, box = el.getBoundingClientRect(), style = getComputedStyle(el);
  return {widgets, toasts, dialogs, note: {text: el.textContent, shown: style.display !== 'none' && style.visibility !== 'hidden'
          && box.width > 50 && box.height > 0, clipped: el.scrollHeight > el.clientHeight + 1,
          inViewport: box.top >= 0 && box.bottom <= window.innerHeight, height: box.height}};
})"""


def queue_in_frontend(browser: Chromium, changes, interrupt_at=None) -> dict:
    return browser.evaluate(f"{QUEUE_AND_WAIT}({json.dumps(changes)}, {json.dumps(interrupt_at)})", timeout=300)


def test_family_warning_is_shown_whole_then_cleared_by_the_next_run(page):
    """Issue #27, items 3 and 4: the Lightning LoRA sampled with the LCM preset puts the whole
    warning (the preset to use included) on DMD2 Generate, unclipped, and in a toast; the same
    graph with the right preset runs again and the note is gone."""
    workflow = load(WORKFLOWS / "sdxl_lightning_4step_lora.json")
    assert not problems_loading(load_in_frontend(page, workflow, "lightning-notes"))
    lcm = "LCM 4-step (lcm, 999,759,499,259)"
    ended = queue_in_frontend(page, [[4, "width", 64], [4, "height", 64], [5, "preset", lcm]])
    assert ended["type"] == "execution_success", ended
    seen = page.evaluate(f"{NOTE_ON_SCREEN}(5)")
    note = seen["note"]
    assert note is not None, seen
    expected = (f"sdxl_lightning_4step_lora.safetensors is a SDXL-Lightning release, but preset '{lcm}' samples the "
                "LCM-LoRA way; its own preset: SDXL-Lightning 4-step (euler, trailing).")
    assert note["text"] == expected
    assert note["shown"] and note["inViewport"] and not note["clipped"], note
    assert any("SDXL-Lightning 4-step (euler, trailing)" in toast for toast in seen["toasts"]), seen["toasts"]

    ended = queue_in_frontend(page, [[5, "preset", "SDXL-Lightning 4-step (euler, trailing)"]])
    assert ended["type"] == "execution_success", ended
    seen = page.evaluate(f"{NOTE_ON_SCREEN}(5)")
    assert seen["note"] is None and "dmd2_note" not in seen["widgets"], seen
    assert not any("$$node-text-preview" == name for name in seen["widgets"])  # no stale stock progress text either


TINY_TRAINING = [[5, "width", 64], [5, "height", 64], [6, "steps", 2], [2, "prompts", "a red cube\na tree by the sea"],
                 [2, "steps", 2], [2, "resolution", 128], [2, "lora_rank", 4], [2, "grad_accum", 1], [2, "warmup_steps", 0],
                 [2, "preview_every", 0]]


def test_training_refusal_is_a_dialog_and_a_subfolder_name_trains(page, workflow_files):
    """Issue #27, item 2, in the training template (several outputs): a lora_name that leaves
    models/loras is an error dialog, not a dropped branch and a green job; a name in a
    subfolder trains there, and the node's note says where the LoRA and the run's files are and
    that loader lists need a refresh (item 13)."""
    workflow = load(WORKFLOWS / "sdxl_train_dmd2_lora.json")
    assert not problems_loading(load_in_frontend(page, workflow, "train-names"))
    ended = queue_in_frontend(page, [*TINY_TRAINING, [2, "lora_name", "../outside"]])
    assert ended["type"] == "execution_error", ended
    assert "is not a name in models/loras" in ended["detail"]["exception_message"]
    seen = page.evaluate(f"{NOTE_ON_SCREEN}(2)")
    assert any("is not a name in models/loras" in dialog for dialog in seen["dialogs"]), seen["dialogs"]

    ended = queue_in_frontend(page, [[2, "lora_name", "frontend/sub_run"]])
    assert ended["type"] == "execution_success", ended
    assert (workflow_files.base / "models" / "loras" / "frontend" / "sub_run.safetensors").is_file()
    seen = page.evaluate(f"{NOTE_ON_SCREEN}(2)")
    note = seen["note"]
    assert note is not None and note["shown"] and not note["clipped"], seen
    assert note["text"].startswith("Saved models/loras/frontend/sub_run.safetensors (2 steps).")
    assert "press R" in note["text"] and "dmd2_training/frontend/sub_run" in note["text"] and "metrics.csv" in note["text"]
    assert "$$node-text-preview" not in seen["widgets"]  # the run's status line gave way to the note
    assert any(text["text"].startswith("starting a new run of 2 steps") for text in ended["progressTexts"]), ended["progressTexts"]


def test_cancelled_training_says_where_its_checkpoint_is_and_resumes(page, workflow_files):
    """Issue #27, item 5: Cancel during training leaves, on the node and in a toast, the step
    of the saved checkpoint and that running again resumes; the next run says it resumes there."""
    workflow = load(WORKFLOWS / "sdxl_train_dmd2_lora.json")
    assert not problems_loading(load_in_frontend(page, workflow, "train-cancel"))
    ended = queue_in_frontend(page, [*TINY_TRAINING, [2, "steps", 200], [2, "lora_name", "frontend_cancelled"]], interrupt_at=["2", 2])
    assert ended["type"] == "execution_interrupted", ended
    stopped = [t["text"] for t in ended["progressTexts"] if t["text"].startswith("stopped: checkpoint saved at step ")]
    assert len(stopped) == 1 and stopped[0].endswith("Run the same graph again to resume"), ended["progressTexts"]
    step = int(stopped[0].split("step ")[1].split(" ")[0])
    assert 2 <= step < 200
    seen = page.evaluate(f"{NOTE_ON_SCREEN}(2)")
    assert any(stopped[0] in toast for toast in seen["toasts"]), seen["toasts"]
    assert "$$node-text-preview" in seen["widgets"]  # the status line stays on the node

    ended = queue_in_frontend(page, [[2, "steps", step + 1]])
    assert ended["type"] == "execution_success", ended
    assert any(t["text"] == f"resuming at step {step} of {step + 1}" for t in ended["progressTexts"]), ended["progressTexts"]


def test_custom_only_widgets_follow_the_preset(page):
    """Issue #27, item 10: custom_timesteps (and the release sampler's custom_rule and gamma)
    are greyed out, value hidden and not editable, unless the preset is 'custom'; picking
    'custom' in the UI turns them on, and the graph's values are kept either way."""
    workflow = load(WORKFLOWS / "sd15_lcm_lora_4step.json")
    assert not problems_loading(load_in_frontend(page, workflow, "lcm-custom"))
    state = """(() => {
      const node = app.graph.nodes.find(n => n.type === 'DMD2Generate');
      const w = (name) => node.widgets.find(w => w.name === name);
      return {preset: w('preset').value, custom: w('custom_timesteps').value, disabled: !!w('custom_timesteps').disabled};
    })()"""
    before = page.evaluate(state)
    assert before["preset"] != "custom" and before["disabled"], before
    page.evaluate("""(() => {
      const node = app.graph.nodes.find(n => n.type === 'DMD2Generate');
      const preset = node.widgets.find(w => w.name === 'preset');
      preset.value = 'custom';
      preset.callback(preset.value, app.canvas, node);
    })()""")
    after = page.evaluate(state)
    assert after == {"preset": "custom", "custom": before["custom"], "disabled": False}, after
    node = page.evaluate("""(() => {
      const node = LiteGraph.createNode('DMD2ReleaseSampler');
      const w = (name) => node.widgets.find(w => w.name === name);
      const off = [!!w('custom_rule').disabled, !!w('gamma').disabled];
      w('preset').value = 'custom'; w('preset').callback('custom');
      const rule = [!!w('custom_rule').disabled, !!w('gamma').disabled];
      w('custom_rule').value = 'tcd'; w('custom_rule').callback('tcd');
      return {off, rule, tcd: [!!w('custom_rule').disabled, !!w('gamma').disabled]};
    })()""")
    assert node == {"off": [True, True], "rule": [False, True], "tcd": [False, False]}, node


# -- the template browser and the node search (issue #27, items 8 and 9) -----------------------

TEMPLATE_META = json.loads((REPO / "web" / "templates.json").read_text())

# Workflow -> Browse Templates, the pack's entry under Extensions, then (optionally) a query typed
# in the browser's search box; the cards the browser then shows, in order.
OPEN_TEMPLATES = """(async (pack) => {
  const sleep = (ms) => new Promise(r => setTimeout(r, ms));
  const until = async (f, what) => {
    for (const end = Date.now() + 30000; Date.now() < end; await sleep(100)) { const v = f(); if (v) return v; }
    throw new Error('template browser: no ' + what);
  };
  for (const b of document.querySelectorAll('.p-dialog-close-button')) b.click();
  await window.app.extensionManager.command.execute('Comfy.BrowseTemplates');
  const content = await until(() => document.querySelector('[data-testid="template-workflows-content"]'), 'grid');
  await until(() => content.querySelector('[data-testid^="template-workflow-"]'), 'cards');
  const dialog = content.closest('.p-dialog') ?? document;
  const entry = await until(() => [...dialog.querySelectorAll('nav *')]
    .find(e => e.children.length === 0 && e.textContent.trim() === pack), 'entry ' + pack);
  entry.click();
  await sleep(300);
  const search = dialog.querySelector('input[type="text"], input:not([type])');
  search.focus();
  search.select();
  return true;
})"""

TEMPLATE_CARDS = """(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map(card => ({
  name: card.dataset.testid.slice('template-workflow-'.length),
  title: card.querySelector('h3')?.textContent.trim(),
  description: card.querySelector('p')?.textContent.trim(),
  chips: [...card.querySelectorAll('h3 ~ * span, [class*="chip"]')].map(c => c.textContent.trim()),
})))()"""


def browse_templates(browser: Chromium, query: str = "") -> list[dict]:
    browser.evaluate(f"{OPEN_TEMPLATES}({json.dumps(PACK_NAME)})")
    if query:
        browser.type_text(query)
    time.sleep(0.8)  # the search is debounced (50 ms), then the grid re-renders
    return browser.evaluate(TEMPLATE_CARDS)


def close_dialogs(browser: Chromium) -> None:
    browser.evaluate("(() => { for (const b of document.querySelectorAll('.p-dialog-close-button')) b.click(); })()")


PACK_NAME = "comfyui-dmd2"


def test_template_browser_shows_titles_and_descriptions(page):
    """Issue #27, item 8: the pack's entry in the template browser lists every template under its
    title and one-line description (templates.json), not under its file stem."""
    cards = browse_templates(page)
    close_dialogs(page)
    shown = {card["name"]: card for card in cards}
    assert set(shown) == {path.stem for path in UI_FILES}, cards
    for name, card in shown.items():
        meta = TEMPLATE_META[name]
        assert card["title"] == meta["title"], card
        assert card["description"] == meta["description"], card
        assert card["title"] != name and card["description"] != name.replace("_", " ")


@pytest.mark.parametrize("query, expected", [
    ("DMD2", {path.stem for path in UI_FILES}),
    ("Lightning", {"sdxl_lightning_4step_lora", "sdxl_lightning_1step_unet"}),
    ("LCM", {"sd15_lcm_lora_4step"}),
])
def test_template_browser_search_finds_the_templates(page, query, expected):
    """Issue #27, item 8: typed in the browser's search box, "DMD2" finds all the pack's templates
    (it found 2 of 11 by file stem) and a family's name finds that family's templates first."""
    names = [card["name"] for card in browse_templates(page, query)]
    close_dialogs(page)
    assert set(names[:len(expected)]) == expected, names
    if query != "DMD2":
        assert "sd15_1step_unet" not in names, names


# The node search box (double-click on the canvas; here its command), a query typed into it, the
# names of the nodes it offers.
NODE_SEARCH = """(async () => {
  const sleep = (ms) => new Promise(r => setTimeout(r, ms));
  const box = () => document.querySelector('.comfy-vue-node-search-box input');
  if (!box()) await window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle');
  for (const end = Date.now() + 10000; !box() && Date.now() < end; await sleep(100));
  box().focus();
  box().select();
  return !!box();
})()"""

NODE_OPTIONS = """(() => [...document.querySelectorAll('.option-display-name > div:first-child')]
  .map(e => e.textContent.replace(/\\u00a0/g, ' ').trim()))()"""


def search_nodes(browser: Chromium, query: str) -> list[str]:
    assert browser.evaluate(NODE_SEARCH)
    browser.type_text(query)
    time.sleep(0.8)
    options = browser.evaluate(NODE_OPTIONS)
    browser.evaluate("(() => document.querySelector('.comfy-vue-node-search-box input')"
                     "?.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true})))()")
    return options


@pytest.mark.parametrize("query, expected", [
    ("lightning", ["DMD2 Generate", "DMD2 LoRA Loader", "DMD2 UNet Loader", "Few-Step Checkpoint Loader"]),
    ("lcm", ["DMD2 Generate", "DMD2 LoRA Loader", "Few-Step Release Sampler", "DMD2 Schedule"]),
    ("hyper", ["DMD2 Generate", "DMD2 LoRA Loader", "DMD2 UNet Loader"]),
    ("turbo", ["DMD2 Generate", "Few-Step Checkpoint Loader"]),
    ("tcd", ["DMD2 Generate", "DMD2 LoRA Loader"]),
    ("SDXL-Lightning", ["DMD2 Generate"]),
])
def test_node_search_finds_the_pack_by_family(page, query, expected):
    """Issue #27, item 9: typed in the node search box, a family's name offers the pack's nodes
    that run it (their search_aliases in /object_info); frontend 1.32.9 searches only names."""
    options = search_nodes(page, query)
    for display_name in expected:
        assert display_name in options, (query, options)
    assert "DMD2 Canny Edge Map" not in options and "DMD2 Sampler" not in options, options
