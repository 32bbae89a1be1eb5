"""DMD2TrainLoRA in a real ComfyUI server on the tiny models: the shipped workflow runs, the
progress (with previews) reaches a websocket client, the LoRA equals what ``dmd2-train``
makes with the same settings, Interrupt + re-queue resumes to the same LoRA, the base model
and the server's memory are given back, and bad input is a clear error with the server up."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from comfy_server import execution_error, output_images
from safetensors.torch import load_file

import websocket

pytestmark = [pytest.mark.server, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
WORKFLOW = TESTS.parent / "workflows" / "api" / "sdxl_train_dmd2_lora.json"
PROMPTS = "a red cube\na tree by the sea\nblue sky over a field"
# Tiny, fast settings where the generator visibly moves: no warmup, a large rate, two
# generator updates (SDXL: 5 fake-score updates per generator update).
TINY = dict(prompts=PROMPTS, steps=6, resolution=128, lora_rank=4, grad_accum=1, warmup_steps=0, lr_generator=1e-3,
            preview_every=3, save_every=1000)
CLI_FLAGS = ["--steps", "6", "--resolution", "128", "--lora-rank", "4", "--grad-accum", "1", "--set", "warmup_steps=0",
             "--set", "lr_generator=1e-3", "--sample-every", "0", "--quiet"]


def training_graph(name: str, **settings) -> dict:
    graph = json.loads(WORKFLOW.read_text())
    graph["2"]["inputs"].update(TINY, lora_name=name, **settings)
    graph["5"]["inputs"].update(width=64, height=64)
    graph["6"]["inputs"]["steps"] = 2
    for node, prefix in (("8", "base"), ("11", "trained")):
        graph[node]["inputs"]["filename_prefix"] = f"{name.replace('/', '_').replace('.', '_')}_{prefix}"
    return graph


class Listener:
    """A websocket client of the server, as the frontend is: collects JSON messages and counts
    binary frames (previews) while a prompt runs."""

    def __init__(self, server):
        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=600)
        self.messages: list[dict] = []
        self.previews = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                opcode, data = self.ws.recv_data()
            except Exception:  # noqa: BLE001 (closed)
                return
            if opcode == websocket.ABNF.OPCODE_BINARY:
                self.previews += 1
            elif opcode == websocket.ABNF.OPCODE_TEXT:
                self.messages.append(json.loads(data))
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return

    def progress(self, node: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == "progress" and m["data"].get("node") == node]

    def close(self):
        self.ws.close()


def submit(server, graph: dict, client_id: str | None = None) -> str:
    status, body = server.post("/prompt", {"prompt": graph, "client_id": client_id or uuid.uuid4().hex})
    assert status == 200, body
    return body["prompt_id"]


def server_rss(server) -> int:
    """The server process's resident memory in bytes (Linux /proc)."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def lora_file(server, name: str) -> Path:
    return server.base / "models" / "loras" / f"{name}.safetensors"


def assert_same_lora(a: Path, b: Path) -> None:
    ours, theirs = load_file(str(a)), load_file(str(b))
    assert ours.keys() == theirs.keys()
    moved = max(float(v.float().abs().max()) for k, v in ours.items() if k.endswith("lora_up.weight"))
    assert moved > 1e-4  # the generator trained: not two untouched zero initialisations
    for key in ours:
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=2e-3, atol=2e-5, msg=key)


def base_graph() -> dict:
    """The workflow's base-model branch alone: checkpoint -> KSampler -> decode -> save."""
    graph = {k: v for k, v in training_graph("unused").items() if k in ("1", "3", "4", "5", "6", "7", "8")}
    graph["8"]["inputs"]["filename_prefix"] = "base_check"
    return graph


@pytest.fixture(scope="module")
def trained(workflow_files, tiny_checkpoints):
    """The shipped workflow, tiny settings, run once with a websocket client listening (after
    the base model alone, whose memory is the 'before' of the memory test)."""
    server = workflow_files
    assert execution_error(server.run(base_graph())) is None
    server.rss_before_training = server_rss(server)
    listener = Listener(server)
    try:
        prompt_id = submit(server, training_graph("node_run"), listener.client_id)
        entry = server.wait(prompt_id, timeout=600)
        time.sleep(0.5)
    finally:
        listener.close()
    return server, entry, listener


def test_shipped_workflow_trains_previews_and_samples_before_and_after(trained):
    server, entry, listener = trained
    assert execution_error(entry) is None, execution_error(entry)
    images = output_images(server, entry)
    assert {p.name.split("_")[2] for p in images} == {"base", "trained"}  # node_run_base_..., node_run_trained_...
    progress = listener.progress("2")
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 6
    assert [p["value"] for p in progress] == sorted(p["value"] for p in progress)
    assert listener.previews >= 2  # the generator's samples at step 3 and 6 (plus the other nodes' previews)
    assert lora_file(server, "node_run").is_file()
    assert entry["outputs"]["9"]["text"] == []  # sampled at the trained timesteps: no note
    # The loss plot went to the PreviewImage node.
    plots = [img for node_id, out in entry["outputs"].items() if node_id == "12" for img in out.get("images", [])]
    assert len(plots) == 1


def test_node_lora_equals_the_command_lora(trained, tiny_checkpoints, tmp_path):
    from comfyui_dmd2.training import cli

    server, _, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    cli.train(["--checkpoint", str(tiny_checkpoints["sdxl"]), "--prompts", str(prompts), "--output", str(tmp_path / "out"), *CLI_FLAGS])
    assert_same_lora(lora_file(server, "node_run"), tmp_path / "out" / "dmd2_tiny_sdxl_lora.safetensors")


def test_node_lora_equals_the_command_lora_on_sd15(trained, tiny_checkpoints, tmp_path):
    """The same on the SD1.5 architecture (10 fake-score updates per generator update: 11
    iterations make two generator updates)."""
    from comfyui_dmd2.training import cli

    server, _, _ = trained
    graph = training_graph("node_run_sd15", steps=11)
    graph["1"]["inputs"]["ckpt_name"] = "v1-5-pruned-emaonly.safetensors"
    entry = server.wait(submit(server, graph))
    assert execution_error(entry) is None, execution_error(entry)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    flags = [f if f != "6" else "11" for f in CLI_FLAGS]
    cli.train(["--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(prompts), "--output", str(tmp_path / "out"), *flags])
    assert_same_lora(lora_file(server, "node_run_sd15"), tmp_path / "out" / "dmd2_tiny_sd15_lora.safetensors")


def interrupt_at_step_2(server, graph: dict, name: str) -> None:
    """Queue ``graph`` (training the run ``name``), press Interrupt once the node has done two
    iterations, and check that it stopped with one checkpoint and no LoRA."""
    listener = Listener(server)
    try:
        prompt_id = submit(server, graph, listener.client_id)
        deadline = time.monotonic() + 300
        while not any(p["value"] >= 2 for p in listener.progress("2")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        request = urllib.request.Request(server.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:  # what the UI's Cancel button sends
            assert response.status == 200
        entry = server.wait(prompt_id)
    finally:
        listener.close()
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and execution_error(entry) is None, kinds
    run = server.base / "output" / "dmd2_training" / name / "checkpoints"
    assert run.is_dir(), json.dumps([listener.progress("2"), sorted(str(p) for p in (server.base / "output").rglob("*")), entry["status"]])
    saved = sorted(p.name for p in run.iterdir())
    assert len(saved) == 1 and 2 <= int(saved[0].split("_")[1]) < 6, saved
    assert not lora_file(server, name).exists()


def test_interrupt_saves_and_the_same_graph_resumes_to_the_same_lora(trained):
    server, _, _ = trained
    graph = training_graph("interrupted", preview_every=0)
    interrupt_at_step_2(server, graph, "interrupted")

    entry = server.wait(submit(server, graph))  # the same graph, queued again
    assert execution_error(entry) is None, execution_error(entry)
    assert_same_lora(lora_file(server, "interrupted"), lora_file(server, "node_run"))


def test_base_model_and_memory_are_given_back(trained):
    """After training, the base model samples exactly as before and a second training does
    not grow the server's memory: adapters, optimisers and caches are freed."""
    server, _, _ = trained
    base_only = base_graph()

    def base_image() -> bytes:
        from PIL import Image

        entry = server.run(base_only)
        assert execution_error(entry) is None
        with Image.open(output_images(server, entry)[0]) as image:
            return image.tobytes()  # the pixels (the PNG's metadata holds the graph)

    before = base_image()
    rss = []
    for i in range(2):
        entry = server.run(training_graph(f"memory_{i}", seed=i + 1))
        assert execution_error(entry) is None, execution_error(entry)
        rss.append(server_rss(server))
    # The same sampling again, through a strength-0 LoRA loader (which returns the model it
    # is given): a graph ComfyUI has not cached, on the very model object that was trained on.
    base_only["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "node_run.safetensors", "strength_model": 0.0}}
    base_only["6"]["inputs"]["model"] = ["30", 0]
    assert base_image() == before  # the base model's layers, forwards and hooks are back
    before = server.rss_before_training
    print(f"server RSS with the base model loaded: {before / 2**20:.0f} MiB; after more trainings: "
          f"{rss[0] / 2**20:.0f} MiB, {rss[1] / 2**20:.0f} MiB")
    assert rss[1] - rss[0] < 48 * 2**20, f"RSS grew by {(rss[1] - rss[0]) / 2**20:.0f} MiB over another training"
    assert rss[1] - before < 128 * 2**20, f"RSS is {(rss[1] - before) / 2**20:.0f} MiB above what it was before training"
    assert server.get("/system_stats")  # still serving


def test_one_step_options_equal_the_command(trained, tiny_checkpoints, tmp_path):
    """The node's fake_score / fake_score_rank / lora_targets are the command's options: a full
    fake score with every layer adapted gives the command's LoRA, at the command's default
    full-network rate (the node's LoRA-F default rate is swapped for it); the LoRA holds the
    extra layers and nothing of the fake score, and ComfyUI's own loader reads it. (After the
    memory test: the full copy's fp32 weights and AdamW state raise the server's RSS high-water
    mark, which that test's bound against the RSS before any training would count.)"""
    from comfyui_dmd2.training import cli

    server, _, _ = trained
    entry = server.wait(submit(server, training_graph("node_full_f", fake_score="full", lora_targets="all", preview_every=0)))
    assert execution_error(entry) is None, execution_error(entry)
    rows = [json.loads(line) for line in (server.base / "output" / "dmd2_training" / "node_full_f" / "metrics.jsonl").read_text().splitlines()]
    assert {row["lr_fake_score"] for row in rows} == {5e-5}  # FULL_FAKE_SCORE_LR["sdxl"], not the LoRA default 5e-4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    cli.train(["--checkpoint", str(tiny_checkpoints["sdxl"]), "--prompts", str(prompts), "--output", str(tmp_path / "out"),
               "--fake-score", "full", "--lora-targets", "all", *CLI_FLAGS])
    ours = lora_file(server, "node_full_f")
    assert_same_lora(ours, tmp_path / "out" / "dmd2_tiny_sdxl_lora.safetensors")
    keys = load_file(str(ours)).keys()
    assert {"lora_unet_conv_in.lora_up.weight", "lora_unet_time_embedding_linear_1.lora_up.weight"} <= keys
    # The sampling half of the workflow ran on the model with this LoRA applied by the node.
    assert {p.name.split("_")[3] for p in output_images(server, entry)} == {"base", "trained"}


def test_regression_pairs_equal_the_command(trained, tiny_checkpoints, tmp_path):
    """The node's regression_pairs (its last, optional input) is the command's --regression-pairs:
    the same warm start on a pool of 3 pairs gives the same LoRA, and the pool sits in the run
    folder."""
    from comfyui_dmd2.training import cli

    server, _, _ = trained
    entry = server.wait(submit(server, training_graph("node_pool", regression_steps=2, regression_pairs=3, preview_every=0)))
    assert execution_error(entry) is None, execution_error(entry)
    folder = server.base / "output" / "dmd2_training" / "node_pool"
    assert len(load_file(str(folder / "regression_pool.safetensors"))["target"]) == 3
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss_regression" in row for row in rows) == 2 and len(rows) == 8
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    cli.train(["--checkpoint", str(tiny_checkpoints["sdxl"]), "--prompts", str(prompts), "--output", str(tmp_path / "out"),
               "--regression-steps", "2", "--regression-pairs", "3", *CLI_FLAGS])
    assert_same_lora(lora_file(server, "node_pool"), tmp_path / "out" / "dmd2_tiny_sdxl_lora.safetensors")


def on_sampling(graph: dict, sampling: str, zsnr: bool) -> dict:
    """``graph`` with ComfyUI's stock ModelSamplingDiscrete node between the checkpoint loader
    and the training (and base sampling) nodes."""
    graph["22"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": sampling, "zsnr": zsnr}}
    graph["2"]["inputs"]["model"] = graph["6"]["inputs"]["model"] = ["22", 0]
    return graph


def test_a_vpred_ztsnr_base_trains_resumes_only_on_its_sampling_and_samples(trained):
    """Issue #24: a v-prediction, zero-terminal-SNR SDXL base is distilled, whether ComfyUI
    reads that from the checkpoint's keys or from a ModelSamplingDiscrete node on the eps
    file (the same weights: the same LoRA, interrupted and resumed or not); the run records
    its sampling, a resume on the eps sampling is refused naming both, and DMD2 Generate
    samples the result."""
    import numpy as np
    from conftest import VPRED_ZTSNR_CHECKPOINT
    from PIL import Image
    from safetensors import safe_open

    server, _, _ = trained
    entry = server.wait(submit(server, on_sampling(training_graph("vpred_node", preview_every=0), "v_prediction", True)))
    assert execution_error(entry) is None, execution_error(entry)

    graph = training_graph("vpred_keys", preview_every=0)
    graph["1"]["inputs"]["ckpt_name"] = VPRED_ZTSNR_CHECKPOINT
    interrupt_at_step_2(server, graph, "vpred_keys")
    eps = training_graph("vpred_keys", preview_every=0)  # the eps file, no ModelSamplingDiscrete node
    error = execution_error(server.wait(submit(server, eps)))
    assert error is not None and error["node_type"] == "DMD2TrainLoRA", error
    message = error["exception_message"].strip()
    assert ("a run named 'vpred_keys' exists" in message and "on a base with sampling v + zsnr; this graph's MODEL has sampling "
            "eps. To continue it, give the MODEL the sampling v + zsnr again") in message and "\n" not in message, message

    entry = server.wait(submit(server, graph))  # the same graph, queued again: resumes
    assert execution_error(entry) is None, execution_error(entry)
    ours = lora_file(server, "vpred_keys")
    assert_same_lora(ours, lora_file(server, "vpred_node"))
    with safe_open(str(ours), framework="pt") as fh:
        assert fh.metadata()["dmd2_sampling"] == "v + zsnr", fh.metadata()
    # Distilled as v-prediction: not what the same settings make of the eps base.
    v_lora, eps_lora = load_file(str(ours)), load_file(str(lora_file(server, "node_run")))
    assert all(torch.isfinite(v).all() for v in v_lora.values())
    differs = max(float((v_lora[k].float() - eps_lora[k].float()).abs().max()) for k in v_lora if k.endswith("lora_up.weight"))
    assert differs > 1e-3, differs
    assert entry["outputs"]["9"]["text"] == []  # sampled at the trained timesteps on the trained sampling: no note
    [image] = [p for p in output_images(server, entry) if "_trained_" in p.name]
    with Image.open(image) as opened:  # a NaN latent decodes to a constant (black) image
        assert float(np.asarray(opened.convert("RGB"), dtype=np.float32).std()) > 1.0


def test_the_training_preset_offers_the_timesteps_dmd2_trains(workflow_files):
    """Issue #27, item 6: the sampling presets of other families (Euler ancestral, TCD...) are
    not offered for training: DMD2's 4-step and 1-step schedules, or a custom list."""
    info = workflow_files.get("/object_info/DMD2TrainLoRA")["DMD2TrainLoRA"]["input"]["required"]["preset"]
    options = info[1]["options"] if info[0] == "COMBO" else info[0]
    assert options == ["4-step (999,749,499,249)", "1-step (399)", "custom"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(prompts="\n# only a comment\n"), "prompts is empty"),
        (dict(lora_name="../escape"), "is not a name in models/loras"),
        (dict(lora_name="sub/../../escape"), "is not a name in models/loras"),
        (dict(lora_name="/abs/name"), "is not a name in models/loras"),
        (dict(preset="custom", custom_timesteps="999,abc"), "custom timestep 'abc' is not an integer"),
        (dict(lora_rank=8), ("a run named 'node_run' exists (dmd2_training/node_run in the output folder, finished at step 6) "
                             "with lora_rank 4; this graph has lora_rank 8. To continue it, set lora_rank back to 4; for a "
                             "new run, choose another lora_name (e.g. 'node_run_2')")),
        (dict(fake_score="full"), "with fake_score rank 4; this graph has fake_score full"),
        (dict(fake_score_rank=16), "this graph has fake_score rank 16"),
        (dict(lora_targets="all"), "with lora_targets"),
        (dict(prompts="a green field\na cat"), ("a run named 'node_run' exists (dmd2_training/node_run in the output folder, "
                                                "finished at step 6) trained on other prompts (3 prompts, sha256 ")),
        (dict(lora_name="dmd2_sdxl_4step_lora_fp16"), "already exists in models/loras"),
    ],
    ids=["no prompts", "dotdot name", "dotdot in a subfolder", "absolute name", "bad custom timesteps", "changed setting",
         "changed fake score", "changed fake-score rank", "changed targets", "changed prompts", "name taken"],
)
def test_bad_input_is_a_clear_error_and_the_server_stays_up(trained, change, message):
    """Every refusal is raised when the node runs (an error dialog in the frontend), never at
    validation: in this multi-output graph ComfyUI would drop a branch that fails validation,
    run the others and report success, with the reason only in the server's console."""
    server, _, _ = trained
    change = dict(change)
    graph = training_graph(change.pop("lora_name", "node_run"), **change)
    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    assert status == 200 and not body.get("node_errors"), body
    entry = server.wait(body["prompt_id"])
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DMD2TrainLoRA", entry["status"]
    assert message in error["exception_message"], error["exception_message"]
    assert "\n" not in error["exception_message"].strip()
    assert server.get("/system_stats")


def test_edited_prompts_are_refused_and_the_offered_name_trains_them(trained):
    """Broken before (issue #27): edited prompts under the name of a finished run 're-trained'
    in a second, re-exporting the old LoRA as a success. Now the run's data is part of what a
    resume must match: the refusal names the prompts, nothing of the old run is rewritten, and
    the name it offers starts a new run on the new prompts."""
    server, _, _ = trained
    lora = lora_file(server, "node_run")
    run = server.base / "output" / "dmd2_training" / "node_run"
    before = (lora.read_bytes(), lora.stat().st_mtime_ns, sorted(p.name for p in (run / "checkpoints").iterdir()))
    new_prompts = "a green field\na cat on a sofa\na lighthouse at night"
    entry = server.wait(submit(server, training_graph("node_run", prompts=new_prompts, steps=1)))
    error = execution_error(entry)
    assert error is not None and "trained on other prompts" in error["exception_message"], entry["status"]
    assert (lora.read_bytes(), lora.stat().st_mtime_ns, sorted(p.name for p in (run / "checkpoints").iterdir())) == before
    offered = error["exception_message"].split("(e.g. '")[1].split("'")[0]
    assert offered == "node_run_2"
    entry = server.wait(submit(server, training_graph(offered, prompts=new_prompts, steps=1)))
    assert execution_error(entry) is None, execution_error(entry)
    settings = json.loads((run.parent / offered / "checkpoints" / "step_0000001" / "settings.json").read_text())
    assert settings["prompts"].startswith("3 prompts, sha256 ") and settings["images"] is None


def test_lora_name_in_a_subfolder_trains_there_and_loads(trained):
    """ComfyUI lists LoRAs in subfolders of models/loras as sub/name.safetensors: the node
    saves there (its run folder likewise), and the name it outputs loads in ComfyUI's loader."""
    server, _, _ = trained
    graph = training_graph("mine/sub_run", steps=1, preview_every=0)
    graph["9"]["inputs"].update(preset="custom", custom_timesteps="999,666,333")  # not the trained 4 steps
    entry = server.wait(submit(server, graph))
    assert execution_error(entry) is None, execution_error(entry)
    [note] = entry["outputs"]["9"]["text"]  # DMD2 Generate knows the LoRA the node trained (issue #27, item 6)
    assert note.startswith("mine/sub_run.safetensors was distilled for 4 step(s); 3 step(s)"), note
    assert entry["outputs"]["2"]["text"][0].startswith("Saved models/loras/mine/sub_run.safetensors (1 steps).")
    assert (server.base / "models" / "loras" / "mine" / "sub_run.safetensors").is_file()
    assert (server.base / "output" / "dmd2_training" / "mine" / "sub_run" / "checkpoints" / "step_0000001").is_dir()
    graph = base_graph()
    graph["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "mine/sub_run.safetensors", "strength_model": 1.0}}
    graph["6"]["inputs"]["model"] = ["30", 0]
    assert execution_error(server.run(graph)) is None


def test_fewer_captions_a_patched_model_and_changed_sampling_are_refused(trained):
    server, _, _ = trained
    graph = training_graph("captions")
    graph["20"] = {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 80, "batch_size": 3, "color": 1234}}
    graph["2"]["inputs"].update(images=["20", 0], captions="one caption\nanother")
    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    assert status == 200, body
    error = execution_error(server.wait(body["prompt_id"]))
    assert error is not None and "captions has 2 lines for 3 images" in error["exception_message"]

    # A ModelSamplingDiscrete node with eps or v_prediction is trained on (issue #24); its other
    # samplings are not DDPM eps/v on SD's table: refused in one line naming what was found.
    for sampling, found in (("lcm", "ModelSamplingDiscreteDistilled"), ("x0", "the MODEL samples with x0 prediction")):
        graph = training_graph(f"sampling_{sampling}")
        graph["22"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": sampling, "zsnr": False}}
        graph["2"]["inputs"]["model"] = ["22", 0]
        error = execution_error(server.wait(submit(server, graph)))
        assert error is not None and found in error["exception_message"], error
        assert "\n" not in error["exception_message"].strip()
        assert not (server.base / "output" / "dmd2_training" / f"sampling_{sampling}").exists()

    graph = training_graph("patched")
    graph["21"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "node_run.safetensors", "strength_model": 1.0}}
    graph["2"]["inputs"]["model"] = ["21", 0]
    error = execution_error(server.wait(submit(server, graph)))
    assert error is not None and "the MODEL carries patches" in error["exception_message"]
    assert server.get("/system_stats")


def test_real_images_with_captions_train_the_gan_term(trained):
    server, _, _ = trained
    graph = training_graph("with_images", steps=2)
    graph["20"] = {"class_type": "EmptyImage", "inputs": {"width": 160, "height": 128, "batch_size": 3, "color": 0x4080C0}}
    graph["2"]["inputs"].update(images=["20", 0], captions="a blue square\n\na blue square, again")
    entry = server.wait(submit(server, graph))
    assert execution_error(entry) is None, execution_error(entry)
    rows = [json.loads(line) for line in (server.base / "output" / "dmd2_training" / "with_images" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_gan_discriminator" in row for row in rows)


def test_other_model_families_are_named(tiny_checkpoints):
    """A MODEL of another family (an SD1.5 InstructPix2Pix, built tiny in-process) is refused by name."""
    import comfy.model_patcher
    import comfy.supported_models
    import tiny_models

    from comfyui_dmd2.nodes.training import TrainingInputError, train_lora

    config = comfy.supported_models.SD15_instructpix2pix(dict(tiny_models.UNET_CONFIGS["sd15"], in_channels=8))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(TrainingInputError, match="model family SD15_instructpix2pix is not supported"):
        train_lora(model, None, None, PROMPTS, "family", "4-step (999,749,499,249)", "", 2, 0, 4, 8.0, 1e-3, 1e-3, 0.0, 64, 1, 1, 0, 0, 0, 10)


def test_fingerprint_reads_the_base_while_a_patched_clone_is_loaded(tiny_checkpoints):
    """ComfyUI writes a loaded clone's LoRA into the shared weights: a LoRA on the time
    embedding (``lora_targets`` all adapts it; the fingerprint reads it) left loaded by an
    earlier graph must not change the base's fingerprint, or a resume would be refused as
    "another model" (it was, before: the node's own full-F/all-targets LoRA, sampled, then an
    interrupted run re-queued)."""
    import comfy.model_management
    import comfy.sd
    import tiny_models

    from comfyui_dmd2.nodes.training import base_fingerprint, unpatched_base_fingerprint

    model = tiny_models.build_model("sdxl")
    before = base_fingerprint(model)
    out_features, in_features = model.model.diffusion_model.time_embed[0].weight.shape
    rank = 2
    lora = {"lora_unet_time_embedding_linear_1.lora_down.weight": torch.ones(rank, in_features),
            "lora_unet_time_embedding_linear_1.lora_up.weight": torch.ones(out_features, rank),
            "lora_unet_time_embedding_linear_1.alpha": torch.tensor(float(rank))}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    try:
        assert base_fingerprint(model) != before  # the LoRA is in the shared weights now
        assert unpatched_base_fingerprint(model) == before
        assert base_fingerprint(model) == before  # and stays out after unloading
    finally:
        comfy.model_management.unload_all_models()
