"""Base-model families: what the sampler, the schedules, the trainer and the nodes need to
know about a base model, in one place below both ``nodes/`` and ``training/``.

A family is a ``Family`` value: its forward process (``Process``: x_t = alpha(t)*x0 +
sigma(t)*noise on the family's own timesteps), the parameterization of its network's output
(``PREDICTIONS``: eps, v, x0; each converts to x0 and back), and the facts about the network
(conditioning, default resolution; its ``Network``: how it is called, its LoRA targets, the block the GAN head reads). Every DMD2
computation works on x0 (docs/training.md, "Prediction types"): x0 = alpha*x_t - sigma*v is
finite at zero terminal SNR, where the eps form (x_t - sigma*eps)/alpha divides by zero.

Members live in one small module each (``sd.py``: SD1.5, SD2.x, SDXL, eps or v, with or
without zero terminal SNR; ``flux.py``: Flux.1 [dev] and [schnell], rectified flow; ``sd3.py``: SD3/SD3.5, rectified flow with CFG) and
register themselves in ``FAMILIES`` (and a reader of ComfyUI models in ``MODEL_READERS``). Pure torch: importable
without ComfyUI; ``family_of`` reads a ComfyUI model (imports ComfyUI lazily).
"""

from __future__ import annotations

from .core import (  # noqa: F401
    FAMILIES,
    MODEL_READERS,
    PREDICTIONS,
    DiscreteVP,
    Family,
    FamilyError,
    Network,
    Prediction,
    Process,
    RectifiedFlow,
    get_family,
    register,
    sampling_label,
    shifted_time,
    trailing_timesteps,
)
from .flux import (  # noqa: F401
    FLUX_DEV,
    FLUX_NETWORK,
    FLUX_SCHNELL,
    FluxNetwork,
    flow_process,
    flux_family,
)
from .sd import (  # noqa: F401
    SD2,
    SD15,
    SDXL,
    UNET,
    UNetNetwork,
    arch_of,
    default_resolution,
    discrete_sampling,
    family_of,
    scaled_linear_alphas_cumprod,
    zero_terminal_snr,
)
from .sd3 import MMDIT_NETWORK, SD3, MMDiTNetwork, sd3_family  # noqa: F401
