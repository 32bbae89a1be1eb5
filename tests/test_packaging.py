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


def test_node_info_carries_search_aliases():
    """Issue #27, item 9: /object_info gives the nodes that run other release families the names
    people search for (web/browse.js searches them); every id in the table is a node of the pack."""
    from comfyui_dmd2.nodes.search import node_search_aliases

    classes = {cls.define_schema().node_id: cls for cls in _node_classes()}
    table = node_search_aliases()
    assert set(table) <= set(classes), set(table) - set(classes)
    generate = classes["DMD2Generate"].GET_NODE_INFO_V1()
    assert generate["name"] == "DMD2Generate" and generate["display_name"] == "DMD2 Generate"
    assert {"lightning", "lcm", "hyper", "turbo", "tcd", "SDXL-Lightning"} <= set(generate["search_aliases"])
    assert "turbo" not in classes["DMD2LoraLoader"].GET_NODE_INFO_V1()["search_aliases"]  # no Turbo LoRA
    assert {"turbo", "lightning"} <= set(classes["DMD2CheckpointLoader"].GET_NODE_INFO_V1()["search_aliases"])
    assert "search_aliases" not in classes["DMD2CannyEdgeMap"].GET_NODE_INFO_V1()


def test_template_browser_metadata_covers_every_template():
    """Issue #27, item 8: web/templates.json gives every workflows/*.json (and nothing else) a
    title the browser's one-line heading shows whole, a one-line description (the browser turns
    '-' and '_' in descriptions into spaces, so there are none) and a family with a colour."""
    import json

    sys.path.insert(0, str(REPO / "tests"))
    from thumbnails import FAMILY_COLOURS

    meta = json.loads((REPO / "web" / "templates.json").read_text())
    assert set(meta) == {p.stem for p in (REPO / "workflows").glob("*.json")}
    titles = [entry["title"] for entry in meta.values()]
    assert len(set(titles)) == len(titles)
    for name, entry in meta.items():
        assert 0 < len(entry["title"]) <= 30 and entry["title"] != name, entry
        description = entry["description"]
        assert 20 < len(description) <= 120 and "\n" not in description, entry
        assert "-" not in description and "_" not in description, entry
        assert entry["tags"] and entry["family"] in FAMILY_COLOURS, entry


def test_every_ui_workflow_has_a_thumbnail():
    """workflows/<name>.jpg beside each template: a real picture of the graph (the frontend
    screenshot, tests/thumbnails.py), small enough for the template browser and the package;
    square as the browser's cards, and told apart by their title bands (issue #27, item 8:
    they were graph strips that all looked alike)."""
    import itertools

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from thumbnails import BAND

    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert len(workflows) >= 5
    bands = {}
    for workflow in workflows:
        thumb = workflow.with_suffix(".jpg")
        assert thumb.is_file(), f"{workflow.name} has no thumbnail {thumb.name}"
        assert 2_000 < thumb.stat().st_size < 150_000, (thumb.name, thumb.stat().st_size)
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and 256 <= image.width <= 1024 and image.height == image.width, image.size
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 8, f"{thumb.name} is nearly one flat colour (std {pixels.std():.1f})"
        bands[thumb.name] = pixels[:BAND]
    for a, b in itertools.combinations(bands, 2):  # the closest pair (4-step UNet / LoRA) differs in 1.5%
        assert (np.abs(bands[a] - bands[b]) > 64).mean() > 0.01, f"{a} and {b} look alike"
    assert not set((REPO / "workflows").glob("*.jpg")) - {w.with_suffix(".jpg") for w in workflows}, "stray thumbnails"


def test_icon_is_a_square_image_of_this_repository():
    """[tool.comfy] Icon: the registry shows it as the pack's picture; it must be a raw GitHub URL
    of a file in this repository (on its default branch) that is a square image."""
    from urllib.parse import urlparse

    from PIL import Image

    meta = _pyproject()
    icon = urlparse(meta["tool"]["comfy"]["Icon"])
    repository = urlparse(meta["project"]["urls"]["Repository"])
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com", icon.geturl()
    owner, name, branch, *path = icon.path.strip("/").split("/")
    assert (repository.netloc, f"{owner}/{name}") == ("github.com", repository.path.strip("/")), icon.geturl()
    assert branch == "main" and path, icon.geturl()
    with Image.open(REPO.joinpath(*path)) as image:
        image.load()
        assert image.width == image.height and 64 <= image.width <= 1024, image.size


def test_comfy_node_pack_leaves_out_tests_and_tooling(tmp_path):
    """The zip `comfy node pack` (and `comfy node publish`) builds: git-tracked files minus
    .comfyignore. Built from a commit of this working tree's files, as a release would be."""
    import zipfile

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    work = tmp_path / "comfyui-dmd2"
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "release"]):
        subprocess.run(git + args, cwd=work, check=True, capture_output=True)
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent)) or shutil.which("comfy")
    assert comfy, "comfy-cli is a test dependency (pip install -e .[test])"
    env = dict(os.environ, COMFY_CLI_TELEMETRY="0")
    result = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "pack"],
                            cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    package = work / "node.zip"
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
    tops = sorted({n.split("/")[0] for n in names})
    print(f"node.zip: {package.stat().st_size / 1e3:.0f} kB, {len(names)} files, top level: {tops}")
    for left_out in ("tests/", "benchmarks/", ".ci/", "scripts/"):
        assert not [n for n in names if n.startswith(left_out)], left_out
    for kept in ("__init__.py", "comfy_env.py", "comfy_server.py", "LICENSE", "README.md", "pyproject.toml",
                 "requirements.txt", "nodes/loaders.py", "nodes/releases.py", "training/cli.py",
                 "web/dmd2.js", "web/browse.js", "web/templates.json"):
        assert kept in names, kept
    workflows = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "workflows").rglob("*") if p.is_file())
    assert set(workflows) <= set(names), set(workflows) - set(names)  # UI + API graphs and thumbnails
    assert any(n.startswith("docs/") for n in names) and any(n.startswith("training/digits/") for n in names)
    assert package.stat().st_size < 5_000_000


def test_docs_link_weight_files_for_direct_download():
    """Hugging Face file links in the docs and workflow notes are /resolve/ (the file), never
    /blob/ (a web page about it); workflows/README.md's table links every registry file."""
    import re

    from comfyui_dmd2.nodes.releases import RELEASES

    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "workflows").rglob("*.md"),
             *(REPO / "workflows").rglob("*.json")]
    for path in texts:
        blob = re.findall(r"huggingface\.co/[^\s)\"']+/blob/[^\s)\"']+", path.read_text())
        assert not blob, f"{path.relative_to(REPO)} links web pages for files: {blob}"
    table = (REPO / "workflows" / "README.md").read_text()
    missing = [r.url for r in RELEASES if f"({r.url})" not in table]
    assert not missing, missing
