"""The shipped SDXL 4-step + canny T2I-Adapter workflow in a real ComfyUI server, on tiny
files placed under the workflow's file names; the UI file and its API twin agree with each
other and with /object_info; bad adapters fail clearly and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_adapters
from comfy_server import execution_error, output_images
from PIL import Image

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
UI_WORKFLOW = REPO / "workflows" / "sdxl_4step_canny_t2i_adapter.json"
API_WORKFLOW = REPO / "workflows" / "api" / "sdxl_4step_canny_t2i_adapter.json"
SMALL = 96  # generation size for the tiny models (a multiple of the SDXL adapter's 32)


@pytest.fixture(scope="module")
def server(workflow_files):
    """The shared server with the workflow's files (conftest) and an SD1.5 adapter beside them."""
    tiny_adapters.save_adapter("sd15", workflow_files.base / "models" / "controlnet" / "tiny-t2i-adapter-sd15.safetensors")
    return workflow_files


def small_api_graph(prefix="dmd2_adapter"):
    graph = json.loads(API_WORKFLOW.read_text())
    for node in graph.values():
        node.pop("_meta", None)
        if node["class_type"] in ("EmptyLatentImage", "DMD2CannyEdgeMap"):
            node["inputs"].update(width=SMALL, height=SMALL)
        if node["class_type"] == "DMD2CannyEdgeMap":
            node["inputs"]["detect_resolution"] = 64
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix
    return graph


def widget_names(spec: dict) -> list[str]:
    """Names of an /object_info node's widget inputs in the order the UI stores their values."""
    names = []
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec["input"].get(section, {}).items():
            is_combo = isinstance(kind, list) or kind == "COMBO"
            if is_combo or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                names.append(name)
                options = opts[0] if opts else {}
                if options.get("control_after_generate"):
                    names.append(None)  # the UI's 'fixed/randomize' value
                if options.get("image_upload"):
                    names.append(None)  # LoadImage's upload widget
    return names


def test_workflow_renders_through_the_real_server(server):
    entry = server.run(small_api_graph())
    assert execution_error(entry) is None, execution_error(entry)
    saved = output_images(server, entry)
    assert len(saved) == 1
    image = Image.open(saved[0])
    assert image.size == (SMALL, SMALL)
    previews = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "temp"]
    assert len(previews) == 1  # the edge map preview


def test_adapter_changes_the_image_in_the_server(server):
    """The conditioning carries the adapter all the way: scale 0 renders a different image."""
    import numpy as np

    def render(scale, prefix):
        graph = small_api_graph(prefix)
        graph["7"]["inputs"]["scale"] = scale
        entry = server.run(graph)
        assert execution_error(entry) is None, execution_error(entry)
        return np.asarray(Image.open(output_images(server, entry)[0]).convert("RGB"), dtype=np.int16)

    with_adapter, without = render(0.8, "dmd2_adapter_on"), render(0.0, "dmd2_adapter_off")
    assert np.abs(with_adapter - without).max() > 2


def test_api_twin_matches_object_info(server):
    info = server.object_info()
    graph = json.loads(API_WORKFLOW.read_text())
    for node_id, node in graph.items():
        spec = info.get(node["class_type"])
        assert spec is not None, f"node {node_id}: {node['class_type']} is not registered"
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        assert set(spec["input"].get("required", {})) <= set(node["inputs"]), node_id
        for name, value in node["inputs"].items():
            assert name in declared, f"node {node_id} ({node['class_type']}) has no input {name!r}"
            kind, *opts = declared[name]
            options = opts[0] if opts else {}
            if isinstance(value, list):  # a link: the source output's type must fit
                source = graph[value[0]]
                assert info[source["class_type"]]["output"][value[1]] == kind, (node_id, name)
            elif isinstance(kind, list) or kind == "COMBO":
                choices = kind if isinstance(kind, list) else options.get("options", [])
                if name not in ("ckpt_name", "image"):  # files: placed by the user
                    assert value in choices, (node_id, name, value)  # DMD2 files and the adapter: offered when missing
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), (node_id, name, value)
    assert graph["7"]["inputs"]["scale"] == 0.8 and graph["7"]["inputs"]["factor"] == 0.5
    assert graph["5"]["inputs"]["detect_resolution"] == 384 and graph["8"]["inputs"]["width"] == 1024


def test_ui_workflow_is_the_api_twin(server):
    """Same nodes, links and widget values in the UI file as in the API file."""
    info = server.object_info()
    ui = json.loads(UI_WORKFLOW.read_text())
    api = json.loads(API_WORKFLOW.read_text())
    assert {str(n["id"]) for n in ui["nodes"]} == set(api)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links)
    for node in ui["nodes"]:
        twin = api[str(node["id"])]
        assert node["type"] == twin["class_type"]
        for slot in node["inputs"]:
            _, src, src_slot, dst, _, kind = links[slot["link"]]
            assert dst == node["id"] and twin["inputs"][slot["name"]] == [str(src), src_slot]
            assert kind == slot["type"]
        names = widget_names(info[node["type"]])
        assert len(names) == len(node.get("widgets_values", [])), node["type"]
        for name, value in zip(names, node.get("widgets_values", [])):
            if name is not None:
                assert twin["inputs"][name] == value, (node["type"], name)
        for i, out in enumerate(node["outputs"]):
            assert info[node["type"]]["output"][i] == out["type"]
            for link_id in out["links"]:
                assert links[link_id][1:3] == [node["id"], i]


def test_sd15_adapter_on_sdxl_fails_clearly_and_server_keeps_serving(server):
    graph = small_api_graph("dmd2_adapter_bad")
    graph["6"] = {"class_type": "DMD2T2IAdapterLoader", "inputs": {"adapter_name": "tiny-t2i-adapter-sd15.safetensors"}}
    error = execution_error(server.run(graph))
    assert error is not None and error["node_type"] == "DMD2ApplyT2IAdapter"
    assert error["exception_type"].endswith("AdapterError")
    assert "SD1.5 T2I-Adapter" in error["exception_message"] and "does not match" in error["exception_message"]

    graph = small_api_graph("dmd2_adapter_bad_size")
    graph["5"]["inputs"].update(width=72, height=72)
    error = execution_error(server.run(graph))
    assert error is not None and "multiple of 32" in error["exception_message"]

    entry = server.run(small_api_graph("dmd2_adapter_after_bad"))
    assert execution_error(entry) is None, execution_error(entry)


def test_pack_loader_and_stock_loader_give_the_same_adapter(server):
    """The workflow's DMD2T2IAdapterLoader gives the same result as ComfyUI's ControlNetLoader for
    an SDXL adapter."""
    import numpy as np

    def render(ours, prefix):
        graph = small_api_graph(prefix)
        assert graph["6"]["class_type"] == "DMD2T2IAdapterLoader"
        if not ours:
            graph["6"] = {"class_type": "ControlNetLoader",
                          "inputs": {"control_net_name": "t2i-adapter-canny-sdxl-1.0.safetensors"}}
        entry = server.run(graph)
        assert execution_error(entry) is None, execution_error(entry)
        return np.asarray(Image.open(output_images(server, entry)[0]).convert("RGB"), dtype=np.int16)

    assert np.abs(render(True, "dmd2_adapter_ours") - render(False, "dmd2_adapter_stock")).max() <= 1


def test_missing_adapter_offline_names_file_folder_and_url(server, tmp_path):
    """The workflow's adapter is a known file: submitted while missing, it is fetched; offline
    (the test server runs with HF_HUB_OFFLINE=1) the node says which file goes in which folder."""
    import shutil

    folder = server.base / "models" / "controlnet"
    name = "t2i-adapter-canny-sdxl-1.0.safetensors"
    shutil.move(folder / name, tmp_path / name)
    try:
        # a prompt without the loader first: ComfyUI drops cached outputs of nodes the new prompt
        # lacks, so no loader output of an earlier test stands in for the missing file
        entry = server.run({"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
                            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
        assert execution_error(entry) is None, execution_error(entry)
        status, body = server.submit(small_api_graph("dmd2_adapter_missing"))
        assert status == 200, body  # offered when missing: not rejected at submit time
        error = execution_error(server.wait(body["prompt_id"], 300))
        assert error is not None and error["node_type"] == "DMD2T2IAdapterLoader", error
        message = error["exception_message"]
        assert "offline" in message and str(folder / name) in message, message
        assert "https://huggingface.co/TencentARC/t2i-adapter-canny-sdxl-1.0/resolve/main/" in message, message
        assert not (folder / name).exists()
    finally:
        shutil.move(tmp_path / name, folder / name)
