"""The shipped workflows (workflows/*.json, UI format; workflows/api/*.json, API format):
every UI graph converts to its API twin, every node type and widget value is valid for the
real server's /object_info, the template browser lists them, and every API graph renders an
image through the real server on tiny models (tiny checkpoints copied to the base-checkpoint
names, tiny DMD2 releases under the release names, latents shrunk to 64x64)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from comfy_server import execution_error, output_images

pytestmark = pytest.mark.server

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
API = WORKFLOWS / "api"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted(API.glob("*.json"))
# Base checkpoints the workflows name -> the tiny checkpoint standing in for it.
# Workflows whose inputs this file cannot provide; run by their own tests.
NOT_RUN_HERE = {
    "sdxl_4step_canny_t2i_adapter": "needs a T2I-Adapter file and an input image; tests/test_adapter_server.py runs it",
    "sdxl_train_dmd2_lora": "trains for 10000 iterations as shipped; tests/test_train_node.py runs it with tiny settings",
}
# Workflows whose DMD2 Generate is expected to put a note on the node (a recipe its release's
# authors did not publish); every other workflow samples its file exactly as published: no note.
EXPECTED_NOTES = {
    "sdxl_dmd2_lora_finetune_8step_cfg": "distilled for 4 step(s); 8 step(s)",
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = ("Note", "MarkdownNote")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def input_specs(info: dict):
    for section in ("required", "optional"):
        yield from info["input"].get(section, {}).items()


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def combo_options(spec):
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options") if spec[0] == "COMBO" else None


def extra_widget_values(name: str, opts: dict) -> int:
    """Frontend-only widgets saved after an input's value: the seed's 'control after generate'
    and an upload button."""
    control = opts.get("control_after_generate") or (name in ("seed", "noise_seed") and "control_after_generate" not in opts)
    return int(bool(control)) + int(bool(opts.get("image_upload") or opts.get("upload")))


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format graph as the frontend does when queueing it (active nodes only)."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in VIRTUAL_NODES:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in input_specs(info):
            opts = spec[1] if len(spec) > 1 else {}
            if is_widget(spec):
                value = values.pop(0)
                del values[:extra_widget_values(name, opts)]
                inputs[name] = value
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        assert values == [], f"node {node['id']} ({node['type']}) has unused widget values {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.fixture(scope="module")
def object_info(workflow_files):
    return workflow_files.object_info()


def test_every_ui_workflow_has_an_api_twin():
    assert len(UI_FILES) >= 4
    assert [p.name for p in UI_FILES] == [p.name for p in API_FILES]
    for name in [*NOT_RUN_HERE, *EXPECTED_NOTES]:
        assert (WORKFLOWS / f"{name}.json").exists(), f"stale exclusion {name}"
    for path in UI_FILES:
        ui = load(path)
        assert ui["version"] == 0.4 and ui["nodes"] and ui["links"] is not None
        assert ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
        assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
        # links agree with the nodes' own input/output records
        for lid, src, src_slot, dst, dst_slot, type_ in ui["links"]:
            nodes = {n["id"]: n for n in ui["nodes"]}
            assert lid in nodes[src]["outputs"][src_slot]["links"]
            assert nodes[dst]["inputs"][dst_slot]["link"] == lid and nodes[dst]["inputs"][dst_slot]["type"] == type_


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_converts_to_its_api_twin(path, object_info):
    api = load(API / path.name)
    converted = ui_to_api(load(path), object_info)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_api_workflow_nodes_and_widget_values_are_valid(path, object_info):
    for node_id, node in load(path).items():
        assert node["class_type"] in object_info, f"{path.name}: unknown node type {node['class_type']}"
        specs = dict(input_specs(object_info[node["class_type"]]))
        required = object_info[node["class_type"]]["input"].get("required", {})
        assert set(required) <= set(node["inputs"]), f"{path.name} node {node_id}: missing {set(required) - set(node['inputs'])}"
        for name, value in node["inputs"].items():
            assert name in specs, f"{path.name} node {node_id}: {node['class_type']} has no input {name}"
            spec = specs[name]
            if isinstance(value, list):  # a link
                assert value[0] in load(path), f"{path.name} node {node_id}: link to missing node {value[0]}"
                continue
            opts = spec[1] if len(spec) > 1 else {}
            options = combo_options(spec)
            where = f"{path.name} node {node_id} {node['class_type']}.{name}={value!r}"
            if options is not None:
                file_like = re.search(r"\.\w{2,12}$", str(value)) is not None
                if path.stem in NOT_RUN_HERE and file_like:
                    continue  # a model/image this test does not install
                assert value in options, f"{where} not among {options[:8]}"
            elif spec[0] == "INT":
                assert isinstance(value, int) and opts.get("min", value) <= value <= opts.get("max", value), where
            elif spec[0] == "FLOAT":
                assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value), where
            elif spec[0] == "BOOLEAN":
                assert isinstance(value, bool), where
            elif spec[0] == "STRING":
                assert isinstance(value, str), where


def test_template_browser_lists_the_workflows(comfy_server):
    listing = comfy_server.get("/workflow_templates")
    assert sorted(listing["comfyui-dmd2"]) == sorted(p.stem for p in UI_FILES)
    served = comfy_server.get("/api/workflow_templates/comfyui-dmd2/sdxl_4step_unet.json")
    assert served == load(WORKFLOWS / "sdxl_4step_unet.json")


def test_template_browser_gets_a_thumbnail_for_each_workflow(comfy_server):
    """The frontend shows each custom-node template with apiURL('/workflow_templates/<pack>/<name>')
    + '.jpg' (mediaSubtype jpg): that URL must answer with a JPEG."""
    import io
    import urllib.request

    from PIL import Image

    listing = comfy_server.get("/workflow_templates")
    for name in listing["comfyui-dmd2"]:
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/comfyui-dmd2/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg", (name, r.status, r.headers["Content-Type"])
            data = r.read()
        assert data == (WORKFLOWS / f"{name}.jpg").read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == "JPEG" and image.width >= 256, (name, image.format, image.size)


RUNNABLE = [p for p in API_FILES if p.stem not in NOT_RUN_HERE]


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_api_workflow_renders_on_tiny_models(path, comfy_server, workflow_files):
    prompt = load(path)
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"wf_{path.stem}"
    entry = comfy_server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    images = output_images(comfy_server, entry)
    assert len(images) == 1 and images[0].stat().st_size > 0
    notes = [text for node_id, node in prompt.items() if node["class_type"] == "DMD2Generate"
             for text in entry.get("outputs", {}).get(node_id, {}).get("text", [])]
    if path.stem in EXPECTED_NOTES:
        assert len(notes) == 1 and EXPECTED_NOTES[path.stem] in notes[0], notes
    else:
        assert notes == [], f"the preset does not fit the workflow's file: {notes}"
    from PIL import Image

    with Image.open(images[0]) as image:
        assert image.size == (64, 64)
