"""Packaging and pack-wide conventions: what a user installing the pack or the registry sees."""

import asyncio
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
ALLOWED_RUNTIME_DEPS = {"torch", "safetensors", "huggingface_hub", "numpy", "pillow"}


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_metadata():
    meta = _pyproject()
    project = meta["project"]
    assert project["license"] == "GPL-3.0-or-later"
    deps = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("-", "_")
            for d in project["dependencies"]}
    assert deps <= ALLOWED_RUNTIME_DEPS, deps - ALLOWED_RUNTIME_DEPS
    assert {"pytest", "diffusers", "scikit-learn"} <= set(project["optional-dependencies"]["test"])
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy, key
    assert project["scripts"]["dmd2-train"] == "comfyui_dmd2.training.cli:main"


def test_comfy_node_validate():
    """The registry's own check (comfy-cli), as `comfy node publish` runs it."""
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent)) or shutil.which("comfy")
    assert comfy, "comfy-cli is a test dependency (pip install -e .[test])"
    env = dict(os.environ, COMFY_CLI_TELEMETRY="0")
    result = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "passed" in out.lower(), out


def test_package_imports_without_comfyui():
    """Tools and the trainer's command import the package on machines where ComfyUI is
    not importable; only comfy_entrypoint needs it."""
    code = ("import sys; sys.path = [p for p in sys.path if 'ComfyUI' not in p]; "
            "import comfyui_dmd2; assert 'comfy' not in sys.modules; "
            "assert callable(comfyui_dmd2.comfy_entrypoint); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def _node_classes():
    import comfyui_dmd2

    extension = asyncio.run(comfyui_dmd2.comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


def test_nodes_follow_pack_conventions():
    classes = _node_classes()
    assert len(classes) >= 6
    ids = set()
    for cls in classes:
        schema = cls.define_schema()
        assert schema.node_id.startswith("DMD2"), schema.node_id
        assert schema.category == "DMD2" or schema.category.startswith("DMD2/"), (schema.node_id, schema.category)
        assert schema.node_id not in ids
        ids.add(schema.node_id)
        for inp in schema.inputs or []:
            assert getattr(inp, "tooltip", None), f"{schema.node_id}.{inp.id} has no tooltip"
    assert {"DMD2Schedule", "DMD2Sampler", "DMD2Generate", "DMD2UNetLoader", "DMD2LoraLoader",
            "DMD2ApplyT2IAdapter"} <= ids
