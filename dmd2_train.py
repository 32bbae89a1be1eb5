"""``dmd2-train`` from a ComfyUI install, with nothing to install or set:

    python ComfyUI/custom_nodes/comfyui-dmd2/dmd2_train.py --checkpoint ... --prompts ... --output ...

Run it with the Python that runs ComfyUI (ComfyUI portable:
``python_embeded\\python.exe ComfyUI\\custom_nodes\\comfyui-dmd2\\dmd2_train.py ...``). It
imports this folder as the package ``comfyui_dmd2`` (the folder name has a dash, so Python
cannot import it by name) and the trainer finds ComfyUI from where the folder sits.
"""

import importlib.util
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent


def import_pack(name: str = "comfyui_dmd2"):
    """This folder as the package ``name``, even if another copy is installed under it."""
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


if __name__ == "__main__":
    # Python put this folder first on sys.path; its nodes/ would shadow ComfyUI's nodes.py.
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != PACK]
    import_pack()
    from comfyui_dmd2.training.cli import main

    raise SystemExit(main())
