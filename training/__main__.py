"""``python -m comfyui_dmd2.training``: the same as the ``dmd2-train`` command."""

from .cli import main

raise SystemExit(main())
