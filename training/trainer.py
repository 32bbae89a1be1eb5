"""The DMD2 training loop, model-agnostic.

The loop never touches a network directly. A *backend* owns the modules (one frozen base,
adapters, a GAN head, full copies: its choice) and exposes forward functions and the
trainable parameter groups; the trainer owns the algorithm, the optimisers, the schedulers
and the randomness. One iteration (``DMD2Trainer.step``) is, as in the paper:

1. the generator makes a batch ``x`` (1-step: from unit noise at the conditioning timestep;
   multi-step: backward simulation from pure noise down to a random one of its timesteps);
2. every ``fake_updates_per_generator_update``-th iteration, the generator is updated with the
   distribution-matching loss (real score = frozen base with classifier-free guidance, fake
   score) plus, when the backend has real latents and a head, the non-saturating GAN loss;
3. every iteration, the fake score (and the GAN head) is updated with the denoising loss on
   the detached ``x`` (plus the discriminator loss on noised real and generated latents).

Usage (the command, a test or the digits demo)::

    trainer = DMD2Trainer(config, backend)
    for _ in range(config.steps):
        metrics = trainer.step()
    torch.save(trainer.state_dict(), path)   # optimisers, schedulers, counter, RNG, weights

DDP: the backend may wrap its trainable modules in DistributedDataParallel and give each
rank its own data; pass ``rank`` so each rank draws different noise. The trainer turns
``requires_grad`` of the fake-score group off while the generator's GAN loss runs through the
head (and back on after), so a DDP-wrapped fake score needs ``find_unused_parameters=True``
or its head call routed outside the wrapper.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from . import losses
from .config import DMD2Config


@dataclass
class Batch:
    """One training batch as the backend gives it.

    ``cond``/``uncond`` are opaque to the trainer and handed back to the backend's forward
    functions unchanged (text embeddings, pooled vectors, class labels...). ``shape`` is the
    shape of a batch of latents ``(B, C, H, W)``. ``real_x0`` (same shape) enables the GAN
    loss; None turns it off."""

    cond: Any
    shape: tuple[int, ...]
    uncond: Any = None
    real_x0: torch.Tensor | None = None


@runtime_checkable
class DMD2Backend(Protocol):
    """What the trainer needs from a model backend.

    All ``*_x0`` functions take ``x_t`` (B, C, H, W), integer timesteps ``t`` (B,) long on
    ``device``, and return the x0 prediction (same shape as ``x_t``). For an eps-prediction
    model use ``losses.x0_from_eps``. The trainer decides where gradients flow (it wraps
    calls in ``torch.no_grad()`` where none are needed); the backend only runs forwards.
    """

    #: (num_train_timesteps,) cumulative alpha products of the model's DDPM schedule
    #: (``losses.sd_alphas_cumprod()`` for SD1.5/SDXL).
    alphas_cumprod: torch.Tensor
    device: torch.device

    def sample_batch(self) -> Batch:
        """The next batch of conditions (and real latents, if the GAN is wanted)."""
        ...

    def generator_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Generator = base + adapter G (or a full copy). Differentiable w.r.t. its parameters."""
        ...

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, guidance_scale: float) -> torch.Tensor:
        """Real score = the frozen base with classifier-free guidance,
        ``uncond + s * (cond - uncond)`` (``losses.classifier_free_guidance``); ``s == 1``
        may skip the unconditional pass. Always called under no_grad."""
        ...

    def fake_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Fake score = base + adapter F (or a full copy), conditional, no guidance."""
        ...

    #: False when the backend has no GAN head: the GAN losses are then off even with real
    #: latents (an absent attribute counts as True).
    has_gan_head: bool

    def fake_logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """GAN head on the fake score's mid-block features: one logit per sample, shape (B,).
        Gradients must flow to ``x_t`` (the generator's GAN loss) and to the head."""
        ...

    def generator_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """Named trainable parameters of the generator (adapter G)."""
        ...

    def fake_score_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """Named trainable parameters of the fake score (adapter F) and the GAN head."""
        ...


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps`` optimiser updates, then constant."""
    return lambda n: min(1.0, (n + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@contextlib.contextmanager
def _frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients into ``params`` (others still flow through them)."""
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)


class DMD2Trainer:
    """The DMD2 loop over a ``DMD2Backend``. See the module docstring."""

    def __init__(
        self,
        config: DMD2Config,
        backend: DMD2Backend,
        rank: int = 0,
        callbacks: Iterable[Callable[[dict[str, float]], None]] = (),
    ):
        config.validate()
        self.config = config
        self.backend = backend
        self.device = torch.device(backend.device)
        self.alphas_cumprod = backend.alphas_cumprod.to(self.device)
        if self.alphas_cumprod.shape != (config.num_train_timesteps,):
            raise ValueError(
                f"backend.alphas_cumprod has shape {tuple(self.alphas_cumprod.shape)}, "
                f"expected ({config.num_train_timesteps},)"
            )
        self.generator_named = list(backend.generator_parameters())
        self.fake_named = list(backend.fake_score_parameters())
        self.generator_params = [p for _, p in self.generator_named]
        self.fake_params = [p for _, p in self.fake_named]
        if not self.generator_params or not self.fake_params:
            raise ValueError("the backend must give trainable parameters for both the generator and the fake score")
        shared = {id(p) for p in self.generator_params} & {id(p) for p in self.fake_params}
        if shared:
            raise ValueError("generator and fake-score parameter groups overlap")
        for p in self.generator_params + self.fake_params:
            p.requires_grad_(True)  # what the backend calls trainable is trained
        adamw = {"betas": config.adam_betas, "weight_decay": config.weight_decay, "eps": config.adam_eps}
        self.generator_optimizer = torch.optim.AdamW(self.generator_params, lr=config.lr_generator, **adamw)
        self.fake_optimizer = torch.optim.AdamW(self.fake_params, lr=config.lr_fake_score, **adamw)
        self.generator_scheduler = torch.optim.lr_scheduler.LambdaLR(self.generator_optimizer, warmup_lambda(config.warmup_steps))
        self.fake_scheduler = torch.optim.lr_scheduler.LambdaLR(self.fake_optimizer, warmup_lambda(config.warmup_steps))
        self.timesteps = torch.tensor(config.generator_timesteps, dtype=torch.long, device=self.device)
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(config.seed * 1000 + rank)
        self.has_gan_head = bool(getattr(backend, "has_gan_head", True))
        self.step_count = 0
        self.callbacks = list(callbacks)

    # --- randomness (all of it from the trainer's own generator, so resume is exact) ---
    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _timesteps(self, low: int, high: int, n: int) -> torch.Tensor:
        """n integer timesteps uniform in [low, high]."""
        return torch.randint(low, high + 1, (n,), generator=self.rng, device=self.device)

    def _full(self, value: int | torch.Tensor, n: int) -> torch.Tensor:
        return torch.full((n,), int(value), dtype=torch.long, device=self.device)

    # --- the generator's sample ---
    def generate(self, batch: Batch, with_grad: bool) -> torch.Tensor:
        """A batch of generator outputs x0, as trained on at this iteration.

        1-step: unit noise at the conditioning timestep (the pack's sampler feeds the UNet
        exactly that). Multi-step: pick step k at random; backward-simulate the first k steps
        from pure noise under no_grad (predict x0, re-noise with fresh noise to the next
        timestep); the generator's prediction at step k is the output."""
        n = batch.shape[0]
        x_t = self._noise(batch.shape)
        k = 0
        if len(self.timesteps) > 1:
            k = int(torch.randint(0, len(self.timesteps), (1,), generator=self.rng, device=self.device))
            if k > 0 and self.config.backward_simulation:
                with torch.no_grad():
                    for j in range(k):
                        x0 = self.backend.generator_x0(x_t, self._full(self.timesteps[j], n), batch.cond)
                        x_t = losses.add_noise(x0, self._noise(batch.shape), self._full(self.timesteps[j + 1], n), self.alphas_cumprod)
            elif k > 0:
                if batch.real_x0 is None:
                    raise ValueError("backward_simulation=False needs real latents from the backend for steps after the first")
                x_t = losses.add_noise(batch.real_x0.to(self.device), x_t, self._full(self.timesteps[k], n), self.alphas_cumprod)
        t = self._full(self.timesteps[k], n)
        with torch.set_grad_enabled(with_grad):
            return self.backend.generator_x0(x_t, t, batch.cond)

    # --- the two updates ---
    def _generator_update(self, batch: Batch, x: torch.Tensor, use_gan: bool) -> dict[str, float]:
        config, n = self.config, x.shape[0]
        t = self._timesteps(config.dm_min_timestep, config.dm_max_timestep, n)
        with torch.no_grad():
            x_t = losses.add_noise(x.detach(), self._noise(x.shape), t, self.alphas_cumprod)
            x0_real = self.backend.real_x0(x_t, t, batch.cond, batch.uncond, config.real_guidance_scale)
            x0_fake = self.backend.fake_x0(x_t, t, batch.cond)
        loss_dm, grad = losses.distribution_matching_loss(x, x0_real, x0_fake)
        loss = loss_dm
        metrics = {"loss_dm": loss_dm.item(), "dm_grad_abs": grad.abs().mean().item()}
        if use_gan:
            t_gan = self._timesteps(config.gan_min_timestep, config.gan_max_timestep, n)
            with _frozen(self.fake_params):
                logits = self.backend.fake_logits(losses.add_noise(x, self._noise(x.shape), t_gan, self.alphas_cumprod), t_gan, batch.cond)
            loss_gan = losses.gan_generator_loss(logits)
            loss = loss + config.gan_generator_weight * loss_gan
            metrics["loss_gan_generator"] = loss_gan.item()
        self.generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm_generator"] = self._clip(self.generator_params)
        self.generator_optimizer.step()
        self.generator_scheduler.step()
        self.generator_optimizer.zero_grad(set_to_none=True)
        return metrics

    def _fake_update(self, batch: Batch, x: torch.Tensor, use_gan: bool) -> dict[str, float]:
        config, n = self.config, x.shape[0]
        x = x.detach()
        t = self._timesteps(config.fake_min_timestep, config.fake_max_timestep, n)
        x_t = losses.add_noise(x, self._noise(x.shape), t, self.alphas_cumprod)
        x0_pred = self.backend.fake_x0(x_t, t, batch.cond)
        loss_fake = losses.fake_score_loss(x0_pred, x, t, self.alphas_cumprod, config.fake_loss_weighting)
        loss = loss_fake
        metrics = {"loss_fake": loss_fake.item()}
        if use_gan:
            real = batch.real_x0.to(self.device, x.dtype)
            t_gan = self._timesteps(config.gan_min_timestep, config.gan_max_timestep, n)
            logits_real = self.backend.fake_logits(losses.add_noise(real, self._noise(real.shape), t_gan, self.alphas_cumprod), t_gan, batch.cond)
            logits_fake = self.backend.fake_logits(losses.add_noise(x, self._noise(x.shape), t_gan, self.alphas_cumprod), t_gan, batch.cond)
            loss_d = losses.gan_discriminator_loss(logits_real, logits_fake)
            loss = loss + config.gan_discriminator_weight * loss_d
            metrics.update(
                loss_gan_discriminator=loss_d.item(),
                logits_real=logits_real.mean().item(),
                logits_fake=logits_fake.mean().item(),
            )
        self.fake_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm_fake"] = self._clip(self.fake_params)
        self.fake_optimizer.step()
        self.fake_scheduler.step()
        self.fake_optimizer.zero_grad(set_to_none=True)
        return metrics

    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    def step(self) -> dict[str, float]:
        """One DMD2 iteration; returns its metrics (and passes them to the callbacks)."""
        batch = self.backend.sample_batch()
        if len(batch.shape) < 2:
            raise ValueError(f"Batch.shape must be (B, ...), got {batch.shape}")
        if batch.real_x0 is not None and tuple(batch.real_x0.shape) != tuple(batch.shape):
            raise ValueError(f"real_x0 has shape {tuple(batch.real_x0.shape)}, expected {tuple(batch.shape)}")
        update_generator = self.step_count % self.config.fake_updates_per_generator_update == 0
        use_gan = batch.real_x0 is not None and self.has_gan_head
        metrics: dict[str, float] = {"step": self.step_count, "generator_updated": float(update_generator)}
        x = self.generate(batch, with_grad=update_generator)
        if update_generator:
            metrics.update(self._generator_update(batch, x, use_gan))
        metrics.update(self._fake_update(batch, x, use_gan))
        metrics["lr_generator"] = self.generator_optimizer.param_groups[0]["lr"]
        metrics["lr_fake_score"] = self.fake_optimizer.param_groups[0]["lr"]
        self.step_count += 1
        for callback in self.callbacks:
            callback(metrics)
        return metrics

    def run(self, steps: int | None = None, progress: bool = True) -> list[dict[str, float]]:
        """Run ``steps`` iterations (default: up to ``config.steps``) with a tqdm bar."""
        remaining = (self.config.steps - self.step_count) if steps is None else steps
        history = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max(remaining, 0), desc="DMD2", unit="it")
        for _ in range(max(remaining, 0)):
            metrics = self.step()
            history.append(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss_dm", "loss_fake")})
        if bar is not None:
            bar.close()
        return history

    # --- checkpoints ---
    def state_dict(self, include_parameters: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: counter, optimisers, schedulers, RNG states and
        (unless the caller saves the adapters itself) the trainable parameters by name."""
        state = {
            "step": self.step_count,
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "fake_optimizer": self.fake_optimizer.state_dict(),
            "generator_scheduler": self.generator_scheduler.state_dict(),
            "fake_scheduler": self.fake_scheduler.state_dict(),
            "rng": {
                "trainer": self.rng.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
            "config": self.config.to_dict(),
        }
        if include_parameters:
            state["generator"] = {name: p.detach().clone() for name, p in self.generator_named}
            state["fake_score"] = {name: p.detach().clone() for name, p in self.fake_named}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; parameter names and shapes are checked first."""
        for key, named in (("generator", self.generator_named), ("fake_score", self.fake_named)):
            if key not in state:
                continue
            saved, own = state[key], dict(named)
            if set(saved) != set(own):
                missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
                raise ValueError(f"{key} parameters do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
            for name, p in own.items():
                if tuple(saved[name].shape) != tuple(p.shape):
                    raise ValueError(f"{key} parameter {name}: saved shape {tuple(saved[name].shape)} != {tuple(p.shape)}")
            with torch.no_grad():
                for name, p in own.items():
                    p.copy_(saved[name])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
        self.generator_scheduler.load_state_dict(state["generator_scheduler"])
        self.fake_scheduler.load_state_dict(state["fake_scheduler"])
        rng = state["rng"]
        self.rng.set_state(rng["trainer"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if rng.get("python") is not None:
            random.setstate(rng["python"])
        self.step_count = int(state["step"])
