"""Node search aliases: the release families a node runs, under the names people type.

The sampler and loader nodes run SDXL-Lightning, Hyper-SD, LCM, TCD and SDXL-Turbo as well as
DMD2, but their names say DMD2 or "Few-Step". ComfyUI 0.3.75's ``io.Schema`` has no
``search_aliases`` (later ComfyUI versions send that key in /object_info and their frontend
searches it), so it is added to each node's /object_info entry here; web/browse.js makes
frontend 1.32.9's node search find the node under those words.
"""

from __future__ import annotations

from .families import FAMILY_NAMES, RECIPES
from .releases import RELEASES


def family_aliases(families) -> list[str]:
    """Each family's short and full name ("lightning", "SDXL-Lightning"); DMD2 is in the names."""
    return [alias for family in sorted(families) if family != "dmd2" for alias in (family, FAMILY_NAMES[family])]


def node_search_aliases() -> dict[str, list[str]]:
    """node id -> aliases, from the presets and the releases each node takes."""
    presets = family_aliases({recipe.family for recipe in RECIPES})

    def files(kind: str) -> list[str]:
        return family_aliases({release.family for release in RELEASES if release.kind == kind})

    return {
        "DMD2Generate": presets,
        "DMD2ReleaseSampler": presets,
        "DMD2Schedule": presets,
        "DMD2UNetLoader": files("unet"),
        "DMD2LoraLoader": files("lora"),
        "DMD2CheckpointLoader": files("checkpoint"),
        "DMD2TrainLoRA": ["distill", "distillation"],
    }


def add_search_aliases(node_class, aliases) -> None:
    """The node's /object_info entry gains ``search_aliases`` (kept where ComfyUI fills it)."""
    node_info = node_class.GET_NODE_INFO_V1.__func__

    def info(cls) -> dict:
        data = node_info(cls)
        if not data.get("search_aliases"):
            data["search_aliases"] = list(cls.SEARCH_ALIASES)
        return data

    node_class.SEARCH_ALIASES = tuple(aliases)
    node_class.GET_NODE_INFO_V1 = classmethod(info)
