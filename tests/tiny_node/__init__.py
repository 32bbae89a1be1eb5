"""Test-only ComfyUI custom node: registers the tiny SD1.5/SDXL model configs (and the tiny
Flux.1 ones, with its text encoders' tiny widths) so that the server's stock loaders recognise
the tiny files the tests write. Defines no nodes."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
import tiny_models  # noqa: E402

tiny_models.register()
tiny_models.register_flux()

NODE_CLASS_MAPPINGS = {}
