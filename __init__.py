"""ComfyUI DMD2: few-step DMD2 nodes and a DMD2 distillation trainer.

ComfyUI imports this folder as a custom node pack and calls ``comfy_entrypoint``. The
import of the node modules is deferred to that call so that this package stays importable
outside ComfyUI (the trainer's command, tools, tests).
"""

NODE_MODULES = ("schedules", "sampler", "loaders", "adapter", "training")
# Served by ComfyUI to the frontend: web/dmd2.js shows the nodes' notes (DMD2 Generate's family
# warnings, the training node's summary) in full on the node and as a toast.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    import importlib

    from comfy_api.latest import ComfyExtension

    node_classes = []
    for name in NODE_MODULES:
        module = importlib.import_module(f"{__name__}.nodes.{name}")
        node_classes.extend(module.NODE_CLASSES)
    search = importlib.import_module(f"{__name__}.nodes.search")
    aliases = search.node_search_aliases()
    for node_class in node_classes:
        node_id = node_class.define_schema().node_id
        if node_id in aliases:
            search.add_search_aliases(node_class, aliases[node_id])

    class DMD2Extension(ComfyExtension):
        async def get_node_list(self):
            return list(node_classes)

    return DMD2Extension()


