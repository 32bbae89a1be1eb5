"""Test-only ComfyUI custom node: registers the tiny SD1.5/SDXL model configs so that the
server's stock loaders recognise the tiny checkpoints the tests write. Defines no nodes."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
import tiny_models  # noqa: E402

tiny_models.register()

NODE_CLASS_MAPPINGS = {}
