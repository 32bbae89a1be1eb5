"""DMD2 on real data at toy scale: scikit-learn's 8x8 handwritten digits.

A small class-conditioned teacher (ComfyUI's own ``UNetModel``, eps-prediction, the SD
1000-step scaled-linear schedule, the class as a one-hot adm vector)
is trained on the digits, then distilled by the same ``DMD2Trainer`` that distils SDXL,
through ``DigitsBackend``. The models are real ComfyUI MODELs (``comfy_model``), so the
pack's sampler nodes sample them like any checkpoint.

Quality is the Fréchet distance in the feature space of a small classifier trained on a
held-out split (``FeatureSpace``). scikit-learn is needed only for its bundled data set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import losses
from .trainer import Batch

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional "class" for classifier-free guidance
SIDE = 8

# A two-level UNet (8x8 and 4x4, 32 channels, no attention, ~0.29M parameters). The class
# enters as a one-hot vector through the UNet's ``label_emb`` (ADM-style: added to the time
# embedding, applied by the scale-shift norms), in ComfyUI terms the model's ``y``/adm input.
UNET_CONFIG = {
    "image_size": SIDE,
    "in_channels": 1,
    "out_channels": 1,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [0, 0],
    "transformer_depth_output": [0, 0, 0, 0],
    "transformer_depth_middle": -1,
    "context_dim": None,
    "use_spatial_transformer": False,
    "use_scale_shift_norm": True,
    "num_classes": "sequential",
    "adm_in_channels": NUM_CLASSES + 1,
    "legacy": False,
    "use_checkpoint": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "num_heads": -1,
    "num_head_channels": 16,
}


# ----------------------------------------------------------------------------- data
@dataclass
class DigitsData:
    """Images in [-1, 1], shape (N, 1, 8, 8); labels (N,), in three disjoint splits:
    ``train`` (the teacher's data), ``heldout`` (trains the feature classifier, nothing else)
    and ``unseen`` (real images no model trained on). ``train`` + ``unseen`` is the distance's
    real reference (``reference_pool``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    unseen_x: torch.Tensor
    unseen_y: torch.Tensor


def load_digits_data(heldout: int = 400, unseen: int = 397, seed: int = 0) -> DigitsData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a test/demo dependency only
        raise ImportError(
            "The digits demo needs scikit-learn for its bundled handwritten-digits data set: pip install scikit-learn"
        ) from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    cut = heldout + unseen
    return DigitsData(images[cut:], labels[cut:], images[:heldout], labels[:heldout], images[heldout:cut], labels[heldout:cut])


# ----------------------------------------------------------------------------- models
def _digits_model_config():
    import comfy.latent_formats
    import comfy.supported_models_base

    class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0

    class DigitsModelConfig(comfy.supported_models_base.BASE):
        unet_config = dict(UNET_CONFIG)
        unet_extra_config = {}
        latent_format = DigitsLatentFormat
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}
        supported_inference_dtypes = [torch.float32]

    return DigitsModelConfig(dict(UNET_CONFIG))


def build_base_model(seed: int = 0):
    """A ComfyUI ``BaseModel`` (eps, SD schedule) wrapping a fresh digits UNet; its adm
    input is the one-hot class from the conditioning's ``pooled_output``."""
    import comfy.model_base

    class DigitsModel(comfy.model_base.BaseModel):
        def encode_adm(self, **kwargs):
            return kwargs.get("pooled_output")

    base = DigitsModel(_digits_model_config(), model_type=comfy.model_base.ModelType.EPS)
    _init_weights(base.diffusion_model, seed)
    return base


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip initialisation; use torch's defaults explicitly (seeded)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in module.modules():
        for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break
    torch.random.set_rng_state(state)


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    """Class labels (NULL_CLASS = unconditional) -> the UNet's adm vector."""
    return F.one_hot(labels.long(), NUM_CLASSES + 1).float()


class DigitsDenoiser(torch.nn.Module):
    """The UNet as an x0 predictor of (x_t, t, labels)."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, timesteps=t.float(), y=one_hot(labels))

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.x0_from_eps(x_t, self.eps(x_t, t, labels), t, self.alphas_cumprod)


def new_teacher(seed: int = 0) -> DigitsDenoiser:
    return DigitsDenoiser(build_base_model(seed).diffusion_model, losses.sd_alphas_cumprod())


def denoiser_state_dict(model: DigitsDenoiser) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}


def load_denoiser(state: dict[str, torch.Tensor]) -> DigitsDenoiser:
    """Rebuild a denoiser from UNet weights, checking the key set and shapes first."""
    model = new_teacher()
    own = model.unet.state_dict()
    if set(state) != set(own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"not a digits model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"digits model key {key}: shape {tuple(state[key].shape)} != {tuple(value.shape)}")
    model.unet.load_state_dict(state)
    return model


def train_teacher(
    data: DigitsData,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.995,
    label_dropout: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> DigitsDenoiser:
    """Plain DDPM training (eps MSE, t uniform in [0, 999]); returns the EMA weights."""
    torch.manual_seed(seed)
    model = new_teacher(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / 200) * (0.5 * (1 + math.cos(math.pi * n / steps))) + 0.02)
    alphas = model.alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(data.train_y), (batch_size,), generator=g)
        x0, labels = data.train_x[idx], data.train_y[idx].clone()
        labels[torch.rand(batch_size, generator=g) < label_dropout] = NULL_CLASS
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model.eps(losses.add_noise(x0, noise, t, alphas), t, labels), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if progress is not None:
            progress(step, loss.item())
    return ema


# ----------------------------------------------------------------------------- sampling
def ddim_timesteps(steps: int) -> list[int]:
    """Evenly spaced from 999 ("trailing"): 4 -> 999, 749, 499, 249; 1 -> 999."""
    return [round(999 - i * 1000 / steps) for i in range(steps)]


@torch.no_grad()
def sample_ddim(model: DigitsDenoiser, labels: torch.Tensor, steps: int, seed: int, guidance: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from pure noise: the teacher's reference sampler."""
    g = torch.Generator().manual_seed(seed)
    alphas = model.alphas_cumprod
    x = torch.randn((len(labels), 1, SIDE, SIDE), generator=g)
    ts = ddim_timesteps(steps)
    for i, t_int in enumerate(ts):
        t = torch.full((len(labels),), t_int)
        x0 = model.x0(x, t, labels)
        if guidance != 1.0:
            x0 = losses.classifier_free_guidance(x0, model.x0(x, t, torch.full_like(labels, NULL_CLASS)), guidance)
        if i + 1 == len(ts):
            return x0
        eps = losses.eps_from_x0(x, x0, t, alphas)
        t_next = torch.full((len(labels),), ts[i + 1])
        x = losses.add_noise(x0, eps, t_next, alphas)
    raise AssertionError("unreachable")


@torch.no_grad()
def sample_student(model: DigitsDenoiser, labels: torch.Tensor, timesteps: Sequence[int], seed: int) -> torch.Tensor:
    """The DMD2 sampler in plain torch (for evaluation during training): unit noise fed at
    the first timestep, predict x0, re-noise with fresh noise to the next timestep."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), 1, SIDE, SIDE), generator=g)
    for i, t_int in enumerate(timesteps):
        x0 = model.x0(x, torch.full((len(labels),), int(t_int)), labels)
        if i + 1 < len(timesteps):
            x = losses.add_noise(x0, torch.randn(x.shape, generator=g), torch.full((len(labels),), int(timesteps[i + 1])), model.alphas_cumprod)
    return x0


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


# ----------------------------------------------------------------------------- ComfyUI
def comfy_model(model: DigitsDenoiser):
    """The denoiser's UNet as a ComfyUI MODEL (ModelPatcher), for the pack's sampler nodes."""
    import comfy.model_management
    import comfy.model_patcher

    base = build_base_model()
    base.diffusion_model.load_state_dict(model.unet.state_dict())
    return comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device()
    )


def comfy_conditioning(labels: torch.Tensor) -> list:
    """CONDITIONING for a batch of class labels: the one-hot class as ``pooled_output`` (the
    model's adm input); the cross-attention tensor is a placeholder the UNet never reads."""
    return [[torch.zeros(len(labels), 1, 1), {"pooled_output": one_hot(labels)}]]


# ----------------------------------------------------------------------------- DMD2 backend
class GANHead(torch.nn.Module):
    """Real/fake classifier on the fake score's mid-block features (B, C, 4, 4) -> (B,)."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.GroupNorm(8, channels),
            torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)[:, 0]


class _MiddleFeatures(Exception):
    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features


class DigitsBackend:
    """``DMD2Backend`` for the digits model. The UNets are tiny, so generator and fake score
    are full copies of the teacher (the ComfyUI backend uses adapters on one base instead;
    the trainer sees no difference)."""

    def __init__(self, teacher: DigitsDenoiser, data: DigitsData, batch_size: int = 64, gan: bool = True, seed: int = 0):
        self.device = torch.device("cpu")
        self.alphas_cumprod = teacher.alphas_cumprod
        self.real = copy.deepcopy(teacher).requires_grad_(False).eval()
        self.generator = copy.deepcopy(teacher).requires_grad_(True).train()
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        self.head = GANHead(UNET_CONFIG["model_channels"] * UNET_CONFIG["channel_mult"][-1])
        self.head.requires_grad_(gan)
        self.has_gan_head = gan
        self.data = data
        self.batch_size = batch_size
        self.rng = torch.Generator().manual_seed(seed)
        # (the UNet calls the middle block's layers one by one: hook its last layer)
        self.fake.unet.middle_block[-1].register_forward_hook(self._stop_at_middle)
        self._want_features = False

    def _stop_at_middle(self, _module, _inputs, output):
        # The head needs only the encoder and the middle block: end the forward there.
        if self._want_features:
            raise _MiddleFeatures(output)

    def sample_batch(self) -> Batch:
        idx = torch.randint(0, len(self.data.train_y), (self.batch_size,), generator=self.rng)
        labels = self.data.train_y[idx]
        return Batch(
            cond=labels,
            uncond=torch.full_like(labels, NULL_CLASS),
            shape=(self.batch_size, 1, SIDE, SIDE),
            real_x0=self.data.train_x[idx] if self.has_gan_head else None,
        )

    def generator_x0(self, x_t, t, cond):
        return self.generator.x0(x_t, t, cond)

    def real_x0(self, x_t, t, cond, uncond, guidance_scale):
        x0 = self.real.x0(x_t, t, cond)
        if guidance_scale == 1.0:
            return x0
        return losses.classifier_free_guidance(x0, self.real.x0(x_t, t, uncond), guidance_scale)

    def fake_x0(self, x_t, t, cond):
        return self.fake.x0(x_t, t, cond)

    def fake_logits(self, x_t, t, cond):
        self._want_features = True
        try:
            self.fake.eps(x_t, t, cond)
        except _MiddleFeatures as stop:
            return self.head(stop.features)
        finally:
            self._want_features = False
        raise RuntimeError("the fake score's middle block did not run")

    def generator_parameters(self):
        return [("generator." + n, p) for n, p in self.generator.unet.named_parameters()]

    def fake_score_parameters(self):
        named = [("fake." + n, p) for n, p in self.fake.unet.named_parameters()]
        if self.has_gan_head:
            named += [("head." + n, p) for n, p in self.head.named_parameters()]
        return named


# ----------------------------------------------------------------------------- metric
class FeatureSpace(torch.nn.Module):
    """A small MLP classifier; its penultimate layer is the feature space of the distance."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(SIDE * SIDE, 128), torch.nn.SiLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, features), torch.nn.SiLU(),
        )
        self.classify = torch.nn.Linear(features, NUM_CLASSES)

    def forward(self, x):
        return self.classify(self.body(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self.body(x.clamp(-1, 1)).double()


def train_feature_space(x: torch.Tensor, y: torch.Tensor, steps: int = 1500, seed: int = 0) -> FeatureSpace:
    torch.manual_seed(seed)
    net = FeatureSpace()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        # light noise augmentation keeps the features smooth around the data
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between fitted Gaussians."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))

    def sqrtm(m):
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrtm(s_a)
    cross = sqrtm(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))


def classifier_accuracy(space: FeatureSpace, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        space.eval()
        return float((space(x.clamp(-1, 1)).argmax(1) == y).float().mean())


def reference_pool(data: DigitsData) -> torch.Tensor:
    """The distance's real images: every digit the feature classifier did not see (``train``
    + ``unseen``, 1397 images). Every model row is compared to all of them."""
    return torch.cat([data.train_x, data.unseen_x])


def real_floor(pool_features: torch.Tensor, model_samples: int, seed: int = 0, splits: int = 8) -> dict[str, float]:
    """The real-vs-real floor, from disjoint subsets of the pool.

    Two disjoint real sets cannot both be as large as a model row (``model_samples`` against
    the whole pool), so the floor is measured on halves (``halves``: n/2 vs n/2) and brought to
    the model rows' sample sizes (``matched``). Between two samples of one distribution the
    Fréchet distance is pure estimator bias, to first order c (1/n1 + 1/n2); c is fitted by
    least squares over ``splits`` random disjoint pairs at each of four sizes."""
    n = len(pool_features)
    g = torch.Generator().manual_seed(2000 + seed)
    h, fd, halves = [], [], []
    for m in (n // 8, n // 4, 3 * n // 8, n // 2):
        for _ in range(splits):
            order = torch.randperm(n, generator=g)
            value = frechet_distance(pool_features[order[:m]], pool_features[order[m : 2 * m]])
            h.append(2 / m)
            fd.append(value)
            if m == n // 2:
                halves.append(value)
    c = float(np.dot(h, fd) / np.dot(h, h))
    return {"halves": float(np.mean(halves)), "half_size": n // 2, "c": c, "matched": c * (1 / model_samples + 1 / n)}


def summarize(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": [float(v) for v in arr]}
