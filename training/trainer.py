"""The DMD2 training loop, model-agnostic.

The loop never touches a network directly. A *backend* owns the modules (one frozen base,
adapters, a GAN head, full copies: its choice) and exposes forward functions and the
trainable parameter groups; the trainer owns the algorithm, the optimisers, the schedulers,
the generator's moving average and the randomness. One iteration (``DMD2Trainer.step``) is,
as in the paper:

1. the generator makes a batch ``x`` (1-step: from unit noise at the conditioning timestep;
   multi-step: backward simulation from pure noise down to a random one of its timesteps);
2. every ``fake_updates_per_generator_update``-th iteration, the generator is updated with the
   distribution-matching loss (real score = frozen base with classifier-free guidance, fake
   score) plus, when the backend has real latents and a head, the non-saturating GAN loss;
   the moving average of the generator follows each update;
3. every iteration, the fake score (and the GAN head) is updated with the denoising loss on
   the detached ``x`` (plus the discriminator loss on noised real and generated latents).

Each iteration draws ``batch_size * grad_accum`` samples and all its random numbers at once,
then runs ``grad_accum`` micro-batches per update, accumulating gradients: the same update
as one batch of that size. An optional regression warm start (``regression_steps``) runs
before the first DMD2 iteration.

Usage (the command, a test or the digits demo)::

    trainer = DMD2Trainer(config, backend)
    trainer.run()                             # config.total_steps iterations
    with trainer.averaged_generator():        # the moving average, for export
        ...
    torch.save(trainer.state_dict(), path)   # optimisers, schedulers, counters, RNG, tensors

Several processes: give each its own data and pass ``rank`` so each draws different noise,
and ``shared_draw`` (rank 0's value of a draw) so all run the same number of backward-
simulation steps, as the reference does; the caller averages gradients
(``run.GradientAverager``). The trainer turns ``requires_grad`` of the fake-score group off
while the generator's GAN loss runs through the head (and back on after).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .. import bases
from . import losses, sampling
from .config import DMD2Config
from .state import copy_checked


def _take(value: Any, part: slice) -> Any:
    return None if value is None else value[part]


@dataclass
class Batch:
    """One training batch as the backend gives it.

    ``cond``/``uncond`` are opaque to the trainer and handed back to the backend's forward
    functions unchanged (text embeddings, pooled vectors, class labels...); they must support
    slicing along the batch (``cond[a:b]``), which gradient accumulation uses. ``shape`` is
    the shape of a batch of latents ``(B, C, H, W)``. ``real_x0`` (same shape) enables the GAN
    loss; None turns it off. The discriminator scores each real latent under ``real_cond``
    (its own caption, or the unconditional embedding) and each generated sample under
    ``gan_cond``; both default to ``cond``. No image is scored against a prompt that does
    not describe it."""

    cond: Any
    shape: tuple[int, ...]
    uncond: Any = None
    real_x0: torch.Tensor | None = None
    real_cond: Any = None
    gan_cond: Any = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def part(self, part: slice) -> Batch:
        """The micro-batch ``part`` of this batch (every field sliced the same way)."""
        size = len(range(*part.indices(len(self))))
        return Batch(
            cond=_take(self.cond, part), shape=(size, *self.shape[1:]), uncond=_take(self.uncond, part),
            real_x0=_take(self.real_x0, part), real_cond=_take(self.real_cond, part), gan_cond=_take(self.gan_cond, part),
        )

    @property
    def real_condition(self) -> Any:
        return self.cond if self.real_cond is None else self.real_cond

    @property
    def gan_condition(self) -> Any:
        return self.cond if self.gan_cond is None else self.gan_cond


@runtime_checkable
class DMD2Backend(Protocol):
    """What the trainer needs from a model backend.

    All ``*_x0`` functions take ``x_t`` (B, C, H, W), integer timesteps ``t`` (B,) long on
    ``device``, and return the x0 prediction (same shape as ``x_t``): a network's own
    output (eps, v) goes there by ``family.to_x0``. The trainer decides where gradients flow
    (it wraps calls in ``torch.no_grad()`` where none are needed); the backend only runs
    forwards.
    """

    #: The base model's family: its forward process (noising, timesteps) and prediction type
    #: (the fake score's loss weighting); ``bases.family_of(model)`` for a ComfyUI model.
    family: bases.Family
    device: torch.device

    def sample_batch(self, n: int) -> Batch:
        """The next ``n`` conditions (and real latents, if the GAN is wanted)."""
        ...

    #: How many prompts ``prompt_batch`` indexes (the regression pool draws among them).
    prompt_count: int

    def prompt_batch(self, indices: Sequence[int]) -> Batch:
        """The conditions of prompts ``indices`` (``uncond`` too; no real latents needed)."""
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

    # Optional: ``gan_head_parameters()`` -> the head's parameters among the above; they are
    # then trained at ``config.lr_gan_head`` (when set) instead of ``lr_fake_score``.
    # Optional: ``cat_conditions([cond_a, cond_b])`` -> one condition batch of both, in that
    # order; the discriminator then scores real and generated latents in one forward.


def warmup_lambda(warmup_steps: int, restart_at: int = 0) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps`` scheduler steps, then constant; with
    ``restart_at`` > 0 the warmup starts again at that step (the regression warm start and
    DMD2 are two runs in the reference, each with its own warmup)."""
    if warmup_steps <= 0:
        return lambda n: 1.0
    return lambda n: min(1.0, ((n - restart_at if 0 < restart_at <= n else n) + 1) / warmup_steps)


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


class _Draws(dict):
    """Every random number one iteration uses, drawn up front for the whole iteration's
    samples; micro-batches take their rows (``part``), so splitting a batch into
    accumulation steps changes nothing but the float summation order."""

    def part(self, part: slice) -> _Draws:
        out = _Draws()
        for key, value in self.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[key] = value[part]
            elif isinstance(value, list):
                out[key] = [v[part] for v in value]
            else:
                out[key] = value
        return out


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over micro-batches (all the same size: the mean over the batch)."""
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]} if rows else {}


class DMD2Trainer:
    """The DMD2 loop over a ``DMD2Backend``. See the module docstring."""

    def __init__(
        self,
        config: DMD2Config,
        backend: DMD2Backend,
        rank: int = 0,
        callbacks: Iterable[Callable[[dict[str, float]], None]] = (),
        shared_draw: Callable[[int], int] | None = None,
    ):
        config.validate()
        self.config = config
        self.backend = backend
        self.device = torch.device(backend.device)
        self.family = backend.family
        if self.family.process.num_train_timesteps != config.num_train_timesteps:
            raise ValueError(
                f"the backend's family has {self.family.process.num_train_timesteps} timesteps, "
                f"expected {config.num_train_timesteps}"
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
        head_ids = {id(p) for p in getattr(backend, "gan_head_parameters", list)()}
        groups = [{"params": [p for p in self.fake_params if id(p) not in head_ids], "lr": config.lr_fake_score}]
        if head_ids and config.lr_gan_head > 0:
            groups.append({"params": [p for p in self.fake_params if id(p) in head_ids], "lr": config.lr_gan_head})
        else:
            groups[0]["params"] = list(self.fake_params)
        self.fake_optimizer = torch.optim.AdamW(groups, lr=config.lr_fake_score, **adamw)
        # Both warm up over iterations (the reference steps both schedulers every iteration).
        self.generator_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.generator_optimizer, warmup_lambda(config.warmup_steps, restart_at=config.regression_steps))
        self.fake_scheduler = torch.optim.lr_scheduler.LambdaLR(self.fake_optimizer, warmup_lambda(config.warmup_steps))
        # fp16 autocast (GPUs without bf16): losses are scaled so small gradients do not flush
        # to zero, unscaled before clipping; a step with inf/nan gradients is skipped and the
        # scale lowered. The adapters themselves stay fp32 (master weights). Off otherwise.
        fp16 = getattr(backend, "autocast_dtype", None) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.timesteps = torch.tensor(config.generator_timesteps, dtype=torch.long, device=self.device)
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(config.seed * 1000 + rank)
        self.has_gan_head = bool(getattr(backend, "has_gan_head", True))
        self.step_count = 0
        self.generator_updates = 0
        self.generator_ema: dict[str, torch.Tensor] | None = None
        if config.ema_decay > 0:
            where = torch.device("cpu") if config.ema_on_cpu else None
            self.generator_ema = {name: p.detach().float().clone().to(where or p.device) for name, p in self.generator_named}
        self.callbacks = list(callbacks)
        # Several processes: the draw of the simulated step, replaced by rank 0's (every rank
        # then waits on the same number of generator passes, not on its slowest).
        self.shared_draw = shared_draw
        # The regression warm start's pool (``regression_pairs`` > 0): built at the first
        # regression iteration unless the caller set it (``run.TrainingRun`` loads or builds
        # it in the run folder); a ``pool.RegressionPool``.
        self.pool = None

    # --- randomness (all of it from the trainer's own generator, so resume is exact) ---
    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _timesteps(self, low: int, high: int, n: int) -> torch.Tensor:
        """n integer timesteps uniform in [low, high]."""
        return torch.randint(low, high + 1, (n,), generator=self.rng, device=self.device)

    def _full(self, value: int | torch.Tensor, n: int) -> torch.Tensor:
        return torch.full((n,), int(value), dtype=torch.long, device=self.device)

    def _draw(self, shape: tuple[int, ...], update_generator: bool, use_gan: bool) -> _Draws:
        """The iteration's random numbers for all its samples, in a fixed order."""
        config, n = self.config, shape[0]
        draws = _Draws(start=self._noise(shape), step=0, simulation=[])
        if len(self.timesteps) > 1:
            k = int(torch.randint(0, len(self.timesteps), (1,), generator=self.rng, device=self.device))
            draws["step"] = k = k if self.shared_draw is None else self.shared_draw(k)
            if config.backward_simulation:
                draws["simulation"] = [self._noise(shape) for _ in range(k)]
        gan = (config.gan_min_timestep, config.gan_max_timestep, n)
        if update_generator:
            draws.update(dm_t=self._timesteps(config.dm_min_timestep, config.dm_max_timestep, n), dm_noise=self._noise(shape))
            if use_gan:
                draws.update(gan_generator_t=self._timesteps(*gan), gan_generator_noise=self._noise(shape))
        draws.update(fake_t=self._timesteps(config.fake_min_timestep, config.fake_max_timestep, n), fake_noise=self._noise(shape))
        if use_gan:
            draws.update(
                gan_real_t=self._timesteps(*gan), gan_real_noise=self._noise(shape),
                gan_fake_t=self._timesteps(*gan), gan_fake_noise=self._noise(shape),
            )
        return draws

    # --- the generator's sample ---
    def generate(self, batch: Batch, draws: _Draws, with_grad: bool) -> torch.Tensor:
        """A batch of generator outputs x0, as trained on at this iteration.

        1-step: unit noise at the conditioning timestep (the pack's sampler feeds the UNet
        exactly that). Multi-step: at the iteration's random step k, backward-simulate the
        first k steps from pure noise under no_grad (predict x0, re-noise with fresh noise to
        the next timestep); the generator's prediction at step k is the output."""
        n, k = len(batch), draws["step"]
        x_t = draws["start"]
        if k > 0 and self.config.backward_simulation:
            with torch.no_grad():
                for j in range(k):
                    x0 = self.backend.generator_x0(x_t, self._full(self.timesteps[j], n), batch.cond)
                    x_t = self.family.add_noise(x0, draws["simulation"][j], self._full(self.timesteps[j + 1], n))
        elif k > 0:
            if batch.real_x0 is None:
                raise ValueError("backward_simulation=False needs real latents from the backend for steps after the first")
            x_t = self.family.add_noise(batch.real_x0.to(self.device), x_t, self._full(self.timesteps[k], n))
        with torch.set_grad_enabled(with_grad):
            return self.backend.generator_x0(x_t, self._full(self.timesteps[k], n), batch.cond)

    # --- the losses of the two updates, per micro-batch ---
    def _generator_loss(self, batch: Batch, draws: _Draws, x: torch.Tensor, use_gan: bool) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        t = draws["dm_t"]
        with torch.no_grad():
            x_t = self.family.add_noise(x.detach(), draws["dm_noise"], t)
            x0_real = self.backend.real_x0(x_t, t, batch.cond, batch.uncond, config.real_guidance_scale)
            x0_fake = self.backend.fake_x0(x_t, t, batch.cond)
        loss_dm, grad = losses.distribution_matching_loss(x, x0_real, x0_fake)
        loss = loss_dm
        metrics = {"loss_dm": loss_dm.item(), "dm_grad_abs": grad.abs().mean().item()}
        if use_gan:
            t_gan = draws["gan_generator_t"]
            with _frozen(self.fake_params):
                noised = self.family.add_noise(x, draws["gan_generator_noise"], t_gan)
                logits = self.backend.fake_logits(noised, t_gan, batch.gan_condition)
            loss_gan = losses.gan_generator_loss(logits)
            loss = loss + config.gan_generator_weight * loss_gan
            metrics["loss_gan_generator"] = loss_gan.item()
        return loss, metrics

    def _fake_loss(self, batch: Batch, draws: _Draws, x: torch.Tensor, use_gan: bool) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        x = x.detach()
        t = draws["fake_t"]
        x0_pred = self.backend.fake_x0(self.family.add_noise(x, draws["fake_noise"], t), t, batch.cond)
        loss_fake = losses.fake_score_loss(x0_pred, x, t, self.family, config.fake_loss_weighting)
        loss = loss_fake
        metrics = {"loss_fake": loss_fake.item()}
        if use_gan:
            real = batch.real_x0.to(self.device, x.dtype)
            t_real, t_fake = draws["gan_real_t"], draws["gan_fake_t"]
            noised_real = self.family.add_noise(real, draws["gan_real_noise"], t_real)
            noised_fake = self.family.add_noise(x, draws["gan_fake_noise"], t_fake)
            cat = getattr(self.backend, "cat_conditions", None)
            if cat is not None:  # one pass of 2B rows instead of two of B: the same logits
                logits = self.backend.fake_logits(torch.cat([noised_real, noised_fake]), torch.cat([t_real, t_fake]),
                                                  cat([batch.real_condition, batch.gan_condition]))
                logits_real, logits_fake = logits.chunk(2)
            else:
                logits_real = self.backend.fake_logits(noised_real, t_real, batch.real_condition)
                logits_fake = self.backend.fake_logits(noised_fake, t_fake, batch.gan_condition)
            loss_d = losses.gan_discriminator_loss(logits_real, logits_fake)
            loss = loss + config.gan_discriminator_weight * loss_d
            metrics.update(
                loss_gan_discriminator=loss_d.item(),
                logits_real=logits_real.mean().item(),
                logits_fake=logits_fake.mean().item(),
                discriminator_accuracy=0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).item(),
            )
        return loss, metrics

    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        from .shard import clip_grad_norm

        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        return clip_grad_norm(params, limit)

    def _micro_batches(self, batch: Batch) -> list[slice]:
        size = self.config.batch_size
        return [slice(i, i + size) for i in range(0, len(batch), size)]

    def _sample_batch(self) -> Batch:
        n = self.config.samples_per_iteration
        batch = self.backend.sample_batch(n)
        if len(batch.shape) < 2 or batch.shape[0] != n:
            raise ValueError(f"the backend gave a batch of shape {batch.shape}, expected ({n}, ...)")
        if batch.real_x0 is not None and tuple(batch.real_x0.shape) != tuple(batch.shape):
            raise ValueError(f"real_x0 has shape {tuple(batch.real_x0.shape)}, expected {tuple(batch.shape)}")
        return batch

    def _step_generator(self) -> float:
        """Clip, step, count the update and fold it into the moving average."""
        self.scaler.unscale_(self.generator_optimizer)
        norm = self._clip(self.generator_params)
        self.scaler.step(self.generator_optimizer)
        self.scaler.update()
        self.generator_optimizer.zero_grad(set_to_none=True)
        self.generator_updates += 1
        self._update_ema()
        return norm

    # --- one iteration ---
    def _dmd2_iteration(self) -> dict[str, float]:
        config = self.config
        batch = self._sample_batch()
        iteration = self.step_count - config.regression_steps
        if iteration == 0 and config.regression_steps > 0:
            # DMD2 starts from the warm-started weights as a run of its own: Adam's moments of
            # the regression gradients would otherwise damp its first thousand steps.
            self.generator_optimizer.state.clear()
        update_generator = iteration % config.fake_updates_per_generator_update == 0
        use_gan = batch.real_x0 is not None and self.has_gan_head
        draws = self._draw(tuple(batch.shape), update_generator, use_gan)
        parts = [(batch.part(s), draws.part(s)) for s in self._micro_batches(batch)]
        accum = len(parts)
        metrics: dict[str, float] = {"step": self.step_count, "generator_updated": float(update_generator)}

        samples, rows = [], []
        if update_generator:
            self.generator_optimizer.zero_grad(set_to_none=True)
            for part, part_draws in parts:
                x = self.generate(part, part_draws, with_grad=True)
                loss, row = self._generator_loss(part, part_draws, x, use_gan)
                self.scaler.scale(loss / accum).backward()
                samples.append(x.detach())
                rows.append(row)
            metrics.update(_mean_metrics(rows))
            metrics["grad_norm_generator"] = self._step_generator()
        else:
            samples = [self.generate(part, part_draws, with_grad=False) for part, part_draws in parts]

        self.fake_optimizer.zero_grad(set_to_none=True)
        rows = []
        for (part, part_draws), x in zip(parts, samples):
            loss, row = self._fake_loss(part, part_draws, x, use_gan)
            self.scaler.scale(loss / accum).backward()
            rows.append(row)
        metrics.update(_mean_metrics(rows))
        self.scaler.unscale_(self.fake_optimizer)
        metrics["grad_norm_fake"] = self._clip(self.fake_params)
        self.scaler.step(self.fake_optimizer)
        self.scaler.update()
        self.fake_optimizer.zero_grad(set_to_none=True)
        self.fake_scheduler.step()
        return metrics

    def _regression_iteration(self) -> dict[str, float]:
        """Warm start: the generator's first step regressed onto the teacher's DDIM sample
        from the same noise (the teacher = the real score, with its guidance): a fresh pair
        per sample, or ``samples_per_iteration`` pairs of the pool drawn with the trainer's RNG."""
        config = self.config
        if config.regression_pairs:
            from .pool import build_pool

            if self.pool is None or not self.pool.complete:
                self.pool = build_pool(config, self.backend, start=self.pool)
            pick = torch.randint(0, len(self.pool), (config.samples_per_iteration,), generator=self.rng, device=self.device).cpu()
            batch = self.backend.prompt_batch(self.pool.prompt_index[pick].tolist())
            noise, targets = self.pool.noise[pick].to(self.device), self.pool.target[pick].to(self.device)
            return self._regress(batch, noise, lambda part, z, s: targets[s])
        batch = self._sample_batch()
        noise = self._noise(tuple(batch.shape))
        teacher_steps = self.family.trailing_timesteps(config.regression_teacher_steps)

        def teacher(part: Batch, z: torch.Tensor, s: slice) -> torch.Tensor:
            with torch.no_grad():
                return sampling.ddim_sample(
                    lambda x, t: self.backend.real_x0(x, t, part.cond, part.uncond, config.real_guidance_scale),
                    z, teacher_steps, self.family,
                )

        return self._regress(batch, noise, teacher)

    def _regress(self, batch: Batch, noise: torch.Tensor, target: Callable[[Batch, torch.Tensor, slice], torch.Tensor]) -> dict[str, float]:
        """One generator update regressing its first step from ``noise`` onto ``target(part, z, rows)``."""
        first = self.timesteps[0]
        self.generator_optimizer.zero_grad(set_to_none=True)
        slices = self._micro_batches(batch)
        total = 0.0
        for s in slices:
            part, z = batch.part(s), noise[s]
            goal = target(part, z, s)
            loss = losses.regression_loss(self.backend.generator_x0(z, self._full(first, len(part)), part.cond), goal)
            self.scaler.scale(loss / len(slices)).backward()
            total += loss.item() / len(slices)
        return {"step": self.step_count, "generator_updated": 1.0, "loss_regression": total, "grad_norm_generator": self._step_generator()}

    def step(self) -> dict[str, float]:
        """One iteration (regression warm start first, then DMD2); returns its metrics (and
        passes them to the callbacks)."""
        rates = {"lr_generator": self.generator_optimizer.param_groups[0]["lr"], "lr_fake_score": self.fake_optimizer.param_groups[0]["lr"]}
        if self.step_count < self.config.regression_steps:
            metrics = self._regression_iteration()
        else:
            metrics = self._dmd2_iteration()
        self.generator_scheduler.step()  # every iteration, updated or not: warmup in iterations
        metrics.update(rates)  # the rates this iteration ran at
        self.step_count += 1
        for callback in self.callbacks:
            callback(metrics)
        return metrics

    def run(self, steps: int | None = None, progress: bool = True) -> list[dict[str, float]]:
        """Run ``steps`` iterations (default: up to ``config.total_steps``) with a tqdm bar."""
        remaining = (self.config.total_steps - self.step_count) if steps is None else steps
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
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss_dm", "loss_fake", "loss_regression")})
        if bar is not None:
            bar.close()
        return history

    # --- the generator's moving average ---
    def _update_ema(self) -> None:
        """Bias-corrected exponential average over the generator's updates: after n updates
        each update weighs (1 - d) d^(n-i) / (1 - d^n), so a short run averages its own
        updates rather than its starting weights."""
        if self.generator_ema is None:
            return
        decay, n = self.config.ema_decay, self.generator_updates
        if self.step_count >= self.config.regression_steps:
            n -= self.config.regression_steps  # the average restarts with DMD2 (warm start excluded)
        weight = (1 - decay) / (1 - decay**n)
        with torch.no_grad():
            for name, p in self.generator_named:
                average = self.generator_ema[name]
                average.lerp_(p.detach().to(average.device, average.dtype), weight)

    @contextlib.contextmanager
    def averaged_generator(self) -> Iterator[None]:
        """Within the block the generator holds its moving average (for export and previews);
        its own weights are put back after. Without an average, nothing changes."""
        if self.generator_ema is None:
            yield
            return
        raw = [p.detach().clone() for p in self.generator_params]
        with torch.no_grad():
            for name, p in self.generator_named:
                p.copy_(self.generator_ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.generator_params, raw):
                    p.copy_(value)

    # --- checkpoints ---
    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors under ``generator/``, ``fake_score/`` and ``generator_ema/``
        prefixes (what a checkpoint stores besides ``state_dict(include_parameters=False)``)."""
        out = {f"generator/{name}": p.detach() for name, p in self.generator_named}
        out |= {f"fake_score/{name}": p.detach() for name, p in self.fake_named}
        if self.generator_ema is not None:
            out |= {f"generator_ema/{name}": value for name, value in self.generator_ema.items()}
        return out

    def load_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore ``tensors()``; the key set and every shape are checked before anything is copied."""
        copy_checked(self.tensors(), saved, "saved tensors do not match this trainer")

    def state_dict(self, include_parameters: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: counters, optimisers, schedulers, RNG states and
        (unless the caller saves ``tensors()`` itself) the trained tensors."""
        state = {
            "step": self.step_count,
            "generator_updates": self.generator_updates,
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
            "scaler": self.scaler.state_dict(),
        }
        if include_parameters:
            state["tensors"] = {name: value.clone() for name, value in self.tensors().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; tensor names and shapes are checked first."""
        if "tensors" in state:
            self.load_tensors(state["tensors"])
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
        self.generator_updates = int(state.get("generator_updates", 0))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
