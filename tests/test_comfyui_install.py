"""The README's install and training sections, followed literally on a fresh copy of ComfyUI
by a Python that has ComfyUI's packages but not this pack: the launcher trains without
``COMFYUI_PATH`` or a pip install of the pack, and the LoRA it exports runs in the workflow
it exports, in that same ComfyUI (stock ``LoraLoaderModelOnly``, checkpoint in a subfolder).

The user's Python is a fresh venv that sees the test venv's site-packages as a plain path
(so its ``.pth`` files, among them the editable install of ``comfyui_dmd2``, are not run). Its
one addition is a start-up hook that registers the tiny test architectures with ComfyUI when
``comfy.sd`` is imported: real checkpoints need no such thing, tiny ones do.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from safetensors import safe_open

from comfyui_dmd2.comfy_env import find_comfyui

pytestmark = [pytest.mark.server, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAST = ["--steps", "2", "--resolution", "128", "--lora-rank", "4", "--grad-accum", "1", "--sample-every", "0",
        "--set", "warmup_steps=0", "--set", "fake_updates_per_generator_update=1", "--quiet"]

TINY_HOOK = '''"""Test-only: register the tiny architectures once ComfyUI's model list has been imported
(dmd2-train reads a checkpoint's family with comfy.model_detection before comfy.sd loads it)."""
import importlib.abc
import importlib.machinery
import sys


class _AfterModelDetection(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "comfy.model_detection":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.modules["comfy"].model_detection = module  # bound before the import returns, for tiny_models' imports
            sys.path.append({tests!r})
            import tiny_models
            tiny_models.register()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterModelDetection())
'''


def readme_commands(section: str) -> list[list[str]]:
    """The commands of the first bash block under the README heading ``section``, one argv
    each (line continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    body = text[text.index(f"## {section}"):]
    block = body[body.index("```bash") + len("```bash"):]
    block = block[: block.index("```")]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def pack_files() -> list[str]:
    """What a clone of the repository holds (tracked and new files, not ignored ones)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


class User:
    """Runs README commands the way a shell would, in ``home``, with ``python``."""

    def __init__(self, home: Path, python: Path):
        self.cwd, self.python = home, python
        self.env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    def run(self, argv: list[str], extra: list[str] = ()) -> subprocess.CompletedProcess | None:
        name, *args = argv
        if name == "cd":
            self.cwd = (self.cwd / args[0]).resolve()
            return None
        if name == "git" and args[0] == "clone":  # no network: the working tree stands in for the clone
            target = self.cwd / args[2]
            for rel in pack_files():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, target / rel)
            return None
        if name == "cp":
            shutil.copy(self.cwd / args[0], self.cwd / args[1])
            return None
        if name == "pip":
            argv = [str(self.python), "-m", "pip", *args]
        elif name == "python":
            argv = [str(self.python), *args, *extra]
        else:
            raise AssertionError(f"the README asks for a command this test does not know: {argv}")
        return subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=600, umask=0o002)


@pytest.fixture(scope="module")
def user(tmp_path_factory, tiny_checkpoints):
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(find_comfyui(), home / "ComfyUI", ignore=shutil.ignore_patterns("__pycache__", ".git", "output", "user", "temp"))
    python_home = home / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(python_home)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(python_home), "platbase": str(python_home)}))
    (site / "_dmd2_test_tiny.py").write_text(TINY_HOOK.format(tests=str(TESTS)))
    (site / "_dmd2_test.pth").write_text(f"{sysconfig.get_path('purelib')}\nimport _dmd2_test_tiny\n")
    python = python_home / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    return User(home, python)


def test_readme_install_and_training_sections_end_in_a_lora_that_runs(user, tiny_checkpoints):
    check = subprocess.run([str(user.python), "-c", "import comfyui_dmd2"], capture_output=True, text=True, cwd=user.cwd, env=user.env)
    assert check.returncode != 0 and "No module named 'comfyui_dmd2'" in check.stderr  # the pack is not installed

    for argv in readme_commands("Install into ComfyUI"):
        done = user.run(argv)
        assert done is None or done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    pack = user.cwd / "comfyui-dmd2"
    assert (pack / "dmd2_train.py").is_file() and not (pack / "comfyui_dmd2.egg-info").exists()

    # What the training section assumes the user has: the checkpoint (in a subfolder of
    # models/checkpoints), prompts.txt and real images with captions.
    training = readme_commands("Training your own few-step LoRA")
    assert training[0] == ["cd", "ComfyUI"]
    command = next(argv for argv in training if argv[0] == "python")
    assert command[1] == "custom_nodes/comfyui-dmd2/dmd2_train.py"
    comfyui = user.cwd.parent
    flags = dict(zip(command[2::2], command[3::2]))
    checkpoint = comfyui / flags["--checkpoint"]
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_checkpoints["sdxl"], checkpoint)
    (comfyui / flags["--prompts"]).write_text("a red cube\na tree by the sea\n")
    from PIL import Image

    images = comfyui / flags["--images"]
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (160, 128), (90 * i, 120, 200)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a square number {i}")

    user.cwd = user.cwd.parent.parent  # back where the install section started
    for argv in training:
        done = user.run(argv, extra=FAST)
        if done is not None:
            assert done.returncode == 0, done.stderr[-4000:]
            assert "starting a new run" in done.stderr and "Traceback" not in done.stderr

    output = comfyui / flags["--output"]
    lora = comfyui / "models" / "loras" / f"dmd2_{checkpoint.stem}_lora.safetensors"
    assert lora.is_file()
    assert oct((output / lora.name).stat().st_mode & 0o777) == oct(0o664)  # the umask's mode (0o002)
    with safe_open(str(lora), "pt") as fh:
        assert fh.metadata()["dmd2_arch"] == "sdxl"
    graph = json.loads((output / "workflow_api.json").read_text())
    by_type = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == str(Path(flags["--checkpoint"]).relative_to("models/checkpoints"))
    assert by_type["LoraLoaderModelOnly"]["lora_name"] == lora.name

    # The exported workflow in this ComfyUI, started by the user's Python with the pack in
    # custom_nodes: stock LoraLoaderModelOnly loads every key of the LoRA.
    from comfy_server import execution_error

    from comfyui_dmd2.comfy_server import ComfyServer

    server = ComfyServer(comfyui, comfyui, custom_nodes={}, python=str(user.python), env_defaults={"OMP_NUM_THREADS": "1"})
    server.start()
    try:
        status, body = server.submit(graph)
        assert status == 200, body
        entry = server.wait(body["prompt_id"])
        assert execution_error(entry) is None, execution_error(entry)
        images = [p for node in entry["outputs"].values() for p in node.get("images", [])]
        assert len(images) == 1 and (comfyui / "output" / images[0]["filename"]).is_file()
        assert "lora key not loaded" not in server.log()
        assert "DMD2Generate" in server.object_info()  # the pack in custom_nodes, loaded by this ComfyUI
    finally:
        server.stop()
