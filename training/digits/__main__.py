"""``python -m comfyui_dmd2.training.digits``: the digits demo."""

from .demo import main

raise SystemExit(main())
