"""The proof of the trainer on real data: scikit-learn's 8x8 digits, on a CPU, in minutes.

Not part of what ships to ComfyUI users; a user of it. ``data`` (the digits and their
splits), ``teacher`` (a class-conditioned ComfyUI UNet and its DDIM sampler), ``flow`` (the
same teacher as ComfyUI's Flux class, trained by rectified flow, #25), ``students``
(the product's trainer and shared-base backend on that teacher), ``metric`` (Fréchet
distance in a held-out classifier's features), ``demo`` (the README's main job:
``python -m comfyui_dmd2.training.digits``), ``comfy_runner`` and ``node`` (sampling in a
real ComfyUI server).
"""
