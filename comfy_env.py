"""Find and import the ComfyUI that this pack runs against.

Inside a ComfyUI server the ``comfy`` package is already importable. Elsewhere (the
trainer's command, tests, benchmarks) it is looked for in this order:

1. ``$COMFYUI_PATH`` — the user's own checkout;
2. the ComfyUI folder this pack sits in (``ComfyUI/custom_nodes/comfyui-dmd2``): what a user
   who cloned the pack into their install gets, with nothing to set;
3. the folder recorded by ``scripts/setup-test-env.sh`` in ``<venv>/comfyui_path.txt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class ComfyUINotFound(RuntimeError):
    pass


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> Path:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    candidates.extend(Path(__file__).resolve().parent.parents)
    recorded = Path(sys.prefix) / "comfyui_path.txt"
    if recorded.is_file():
        candidates.append(Path(recorded.read_text().strip()))
    for path in candidates:
        if _is_comfyui(path):
            return path.resolve()
    raise ComfyUINotFound(
        "ComfyUI was not found. Set COMFYUI_PATH to your ComfyUI folder (the one holding "
        "main.py and comfy/), keep this pack in ComfyUI/custom_nodes/, or run "
        "scripts/setup-test-env.sh to install the pinned copy."
    )


def ensure_comfy(cpu: bool | None = None) -> Path:
    """Make ``import comfy`` work and return ComfyUI's folder.

    On a machine without a usable CUDA device ComfyUI must be told ``--cpu`` before
    ``comfy.model_management`` is first imported, or it fails looking for a driver.
    """
    try:
        import comfy  # noqa: F401

        # ComfyUI's comfy is a namespace package (no __init__.py): its __file__ is None
        root = Path(next(iter(comfy.__path__))).resolve().parent
    except ImportError:
        root = find_comfyui()
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        if cpu:
            comfy.cli_args.args.cpu = True
    return root
