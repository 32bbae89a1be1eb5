"""How much memory a training iteration holds at its peak, measured or estimated.

``TensorMemory`` counts the bytes of every live tensor storage (weights, adapters, optimiser
state, gradients, saved activations, temporaries) and keeps the peak: what
``torch.cuda.max_memory_allocated`` reports on a GPU, on any device. Run on real tensors it
measures; run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
devices, no data, no compute) it *estimates* the same figure for the very code the run
executes, before any weight is loaded: that is ``dmd2-train --estimate``.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

GiB = 2**30


class TensorMemory(TorchDispatchMode):
    """A dispatch mode that tracks live storage bytes and their peak.

    Tensors that exist before the mode is entered are counted once passed to ``track``.
    With ``scalars_as_one`` (fake tensors: there is no value to read), reading a tensor's
    value (``.item()``, ``float(t)``, ``int(t)``) gives 1 (False for a bool): the loop's metrics and random step
    choices are then meaningless, but no buffer's size depends on them."""

    def __init__(self, scalars_as_one: bool = False):
        super().__init__()
        self.scalars_as_one = scalars_as_one
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.flops = 0.0  # of the matrix products and convolutions run (torch's FLOP formulas)
        self.new_scale = 1.0  # the share of each new storage counted (``profile_iterations``' shards)

    def track(self, *tensors: torch.Tensor, scale: float = 1.0) -> None:
        """Count ``tensors`` from now on, each storage at ``scale`` of its bytes (1/N: the
        share one of N processes holds of a sharded tensor)."""
        for t in tensors:
            self._add(t, scale)

    def rescale(self, t: torch.Tensor, scale: float) -> None:
        """Count ``t``'s (tracked) storage at ``scale`` of its bytes from now on."""
        key = id(t.untyped_storage())
        if key in self._live:
            size = int(t.untyped_storage().nbytes() * scale)
            self.current += size - self._live[key]
            self._live[key] = size

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, t: torch.Tensor, scale: float | None = None) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = int(storage.nbytes() * (self.new_scale if scale is None else scale))
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.scalars_as_one and func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._add(value)
        return out


# --- one iteration, profiled ----------------------------------------------------------------


def _storages_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _batch_bytes(batch) -> int:
    """Bytes of a ``trainer.Batch``'s tensors (its conditions and real latents)."""
    tensors = []
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)  # a tensor, or a condition (``backend.Conditioning``: context and y)
        tensors += [value] if isinstance(value, torch.Tensor) else [getattr(value, "context", None), getattr(value, "y", None)]
    return _storages_bytes([t for t in tensors if isinstance(t, torch.Tensor)])


def _prime(optimizer) -> None:
    """Create the optimiser's state (AdamW makes it at its first step) without changing a
    weight: one step at learning rate 0 on zero gradients. The profiled iteration then holds
    what every iteration after the first holds."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr


@dataclass
class IterationProfile:
    """Memory (bytes) and work of training iterations: the parts that live through them,
    the peak of live tensors, and the FLOPs of a generator-update and a fake-score-only
    iteration, against one UNet forward of one sample."""

    peak: int
    base_weights: int
    trainable: int  # adapters G and F and the GAN head, fp32
    gan_head: int  # the head's share of ``trainable``
    ema: int  # the generator's moving average where it counts (0 when held on the CPU)
    optimizer_state: int
    accumulated_gradients: int  # gradients held between micro-batches (grad_accum > 1)
    flops_generator_iteration: float
    flops_fake_iteration: float
    unet_forward_flops: float
    samples: int  # samples per micro-batch
    fake_updates_per_generator_update: int
    shards: int = 1  # processes a full fake score is sharded over (its weights, gradients, AdamW state: 1/shards each)
    unshard_transient: int = 0  # the gathered fake-score blocks at a time (FSDP2), part of ``peak``
    batch_data: int = 0  # the other micro-batches' conditions and latents (grad_accum > 1), part of ``peak``

    @property
    def static(self) -> int:
        return self.base_weights + self.trainable + self.ema + self.optimizer_state

    @property
    def activations(self) -> int:
        """Gradients, saved activations and temporaries at the peak: what is not static."""
        return self.peak - self.static

    def forward_equivalents(self) -> dict[str, float]:
        """UNet forward-equivalents per sample (FLOPs / one UNet forward of one sample;
        a backward costs one forward through frozen layers, two where weights train)."""
        unit = self.unet_forward_flops * self.samples
        g, f, n = self.flops_generator_iteration / unit, self.flops_fake_iteration / unit, self.fake_updates_per_generator_update
        return {"generator_iteration": g, "fake_iteration": f, "mean_iteration": (g + (n - 1) * f) / n}

    def parts(self) -> list[tuple[str, int]]:
        parts = [
            ("frozen base weights", self.base_weights),
            ("trained weights: G, F, GAN head (fp32)", self.trainable),
            ("generator moving average", self.ema),
            ("optimizer state (AdamW)", self.optimizer_state),
            ("activations, gradients, temporaries at the peak",
             self.activations - self.accumulated_gradients - self.unshard_transient - self.batch_data),
        ]
        if self.shards > 1:
            parts.append((f"fake-score blocks gathered (sharded over {self.shards})", self.unshard_transient))
        if self.accumulated_gradients:
            parts.append(("gradients held between micro-batches", self.accumulated_gradients))
        if self.batch_data:
            parts.append(("the other micro-batches' conditions and latents", self.batch_data))
        return parts

    def scaled(self, rank_ratio: float = 1.0, pixel_ratio: float = 1.0, ema: bool = True) -> int:
        """The peak with the LoRA rank times ``rank_ratio`` (adapters, their optimizer state,
        average and gradients scale with it exactly), the pixels times ``pixel_ratio``
        (activations scale about linearly with them: SDPA attention holds no N x N map) and
        the moving average off the device (``ema=False``). An approximation for advice;
        ``--estimate`` with those settings gives the figure."""
        lora = self.trainable - self.gan_head
        lora_share = lora / self.trainable if self.trainable else 0.0
        rank_scaled = self.trainable - lora * (1 - rank_ratio)
        optimizer = self.optimizer_state * (1 - lora_share * (1 - rank_ratio))
        average = self.ema * rank_ratio if ema else 0
        grads = self.accumulated_gradients * rank_ratio
        activations = (self.activations - self.accumulated_gradients) * pixel_ratio
        return int(self.base_weights + rank_scaled + average + optimizer + grads + activations)


# What a GPU needs besides the tensors: the CUDA context and the caching allocator's slack.
GPU_RESERVE = int(1.5 * GiB)


def budget_advice(profile: IterationProfile, budget_gib: float, rank: int, resolution: int, ema_on_device: bool,
                  checkpointing: bool, full_fake_score: bool = False) -> list[str]:
    """Lines saying whether the run fits ``budget_gib`` of GPU memory and, if not, which
    settings to change, cheapest in quality first, each with the peak it leads to (with a
    full fake score: first go back to LoRA F, which holds 16 bytes per UNet parameter less)."""
    budget = budget_gib * GiB
    need = lambda peak: peak + GPU_RESERVE  # noqa: E731
    gib = lambda n: f"{n / GiB:.1f} GiB"  # noqa: E731
    if need(profile.peak) <= budget:
        return [f"fits {budget_gib:g} GiB: {gib(profile.peak)} peak + {gib(GPU_RESERVE)} for the CUDA context and allocator slack"]
    lines = [f"does not fit {budget_gib:g} GiB: {gib(profile.peak)} peak + {gib(GPU_RESERVE)} for the CUDA context and allocator slack"]
    if full_fake_score:
        lines.append("  --fake-score lora: a LoRA fake score instead of the full copy (its fp32 weights, gradients and AdamW "
                     "state: 16 bytes per UNet parameter); run --estimate again with it for further advice")
        lines.append("  or several GPUs under torchrun, which shard the full fake score across them (--estimate --world-size N "
                     "gives each one's peak)")
        return lines
    if not checkpointing:
        lines.append("  --gradient-checkpointing on: recomputes activations in the backward pass (much less memory; "
                     "run --estimate again to see how much)")
    ema, rank_ratio, pixel_ratio, flags = ema_on_device, 1.0, 1.0, []
    steps = []
    if ema_on_device and profile.ema:
        steps.append(("--set ema_on_cpu=true (the moving average in CPU memory; same result)", dict(ema=False)))
    for r in (32, 16, 8):
        if r < rank:
            steps.append((f"--lora-rank {r} (fewer adapter parameters and optimizer state; less capacity)", dict(rank=r)))
    for res in (896, 768, 640, 512):
        if res < resolution:
            steps.append((f"--resolution {res} (activations scale with the pixels; the LoRA then learns at that size)", dict(resolution=res)))
    for flag, change in steps:
        ema = change.get("ema", ema)
        rank_ratio = change.get("rank", rank * rank_ratio) / rank
        pixel_ratio = (change.get("resolution", resolution * pixel_ratio**0.5) / resolution) ** 2
        flags.append(flag.split(" (")[0])
        peak = profile.scaled(rank_ratio, pixel_ratio, ema)
        fits = need(peak) <= budget
        lines.append(f"  + {flag}: about {gib(peak)}{'  -> fits' if fits else ''}")
        if fits:
            lines.append(f"to fit {budget_gib:g} GiB: {' '.join(flags)} (check with --estimate and those flags)")
            return lines
    lines.append(f"even with all of the above it would not fit {budget_gib:g} GiB")
    return lines


def report(profile: IterationProfile) -> list[str]:
    """The estimate as the command prints it."""
    lines = [f"peak memory: {profile.peak / GiB:.2f} GiB of tensors (what torch.cuda.max_memory_allocated reports)"]
    lines += [f"  {name:50s} {size / GiB:6.2f} GiB" for name, size in profile.parts()]
    fe = profile.forward_equivalents()
    lines.append(f"work per sample, in UNet forward-equivalents (FLOPs over one UNet forward; a backward costs one to two): "
                 f"{fe['generator_iteration']:.1f} in an iteration that updates the generator, {fe['fake_iteration']:.1f} in one "
                 f"that only updates the fake score; {fe['mean_iteration']:.1f} on average "
                 f"(one generator update every {profile.fake_updates_per_generator_update} iterations)")
    return lines


def work_report(profile: IterationProfile, config, world_size: int = 1) -> list[str]:
    """The whole run's work per process in UNet forward-equivalents (``--estimate`` gives
    no time: it depends on the GPU): DMD2's iterations, and the regression warm start's
    teacher forwards with fresh pairs and with the run's pool (``pool.warm_start_forwards``;
    the generator's own regression passes are the same in both and left out)."""
    dmd2 = profile.forward_equivalents()["mean_iteration"] * config.samples_per_iteration * config.steps
    lines = [(f"work of the run (per process, UNet forward-equivalents): DMD2 {config.steps:,} iterations x "
              f"{config.samples_per_iteration} samples = {dmd2:,.0f}")]
    if config.regression_steps:
        lines.append(f"  {warm_start_report(config, world_size)}")
    return lines


def warm_start_report(config, world_size: int = 1) -> str:
    """The regression warm start's teacher UNet forwards per process, fresh pairs against the
    run's pool (``pool.warm_start_forwards``: ``world_size`` processes share its build):
    ``--estimate``'s line and the start-up log's."""
    from .pool import teacher_forwards_per_pair, warm_start_forwards

    forwards, per_pair = warm_start_forwards(config, world_size), teacher_forwards_per_pair(config)
    fresh = (f"fresh pairs {config.regression_steps:,} iterations x {config.samples_per_iteration} samples x {per_pair} = "
             f"{forwards['fresh']:,}")
    if not config.regression_pairs:
        return f"regression warm start, teacher UNet forwards: {fresh} (--regression-pairs N: N x {per_pair} instead)"
    ratio = forwards["fresh"] / forwards["pool"]
    reuse = config.regression_steps * config.samples_per_iteration / config.regression_pairs
    pool = (f"a pool of {config.regression_pairs:,} pairs x {per_pair} = {forwards['pool']:,}, built once" if world_size == 1 else
            f"a pool of {config.regression_pairs:,} pairs x {per_pair}, built once by {world_size} processes: {forwards['pool']:,} each")
    return (f"regression warm start, teacher UNet forwards: {pool}, each pair drawn {reuse:.1f}x on average; "
            + (f"{ratio:.1f}x fewer than {fresh}" if ratio >= 1 else f"{1 / ratio:.1f}x more than {fresh}"))


def profiling_config(config):
    """The configuration a profiled run is built with: ``config`` with one micro-batch per
    update (``profile_iterations`` adds what more micro-batches hold), a generator update
    every second iteration (one of each kind) and no regression warm start."""
    return dataclasses.replace(config, grad_accum=1, fake_updates_per_generator_update=2, regression_steps=0, warmup_steps=0)


def _tracked(trainer, backend, scalars_as_one: bool, shards: int = 1) -> tuple[TensorMemory, dict[str, list], list]:
    """Prime both optimisers and start tracking everything that lives through iterations.
    ``shards`` > 1: a full fake score counted as one of that many processes holds it sharded
    (``shard.shard_module``): its weights, its AdamW state, each of its gradients once
    accumulated and everything its optimiser step allocates at 1/shards. Returns the tracker,
    the parts and the hooks to remove after."""
    for optimizer in (trainer.generator_optimizer, trainer.fake_optimizer):
        _prime(optimizer)
    copy = getattr(backend, "copies", {}).get("fake_score") if shards > 1 else None
    sharded = list(copy.parameters()) if copy is not None else []
    sharded_state = [v for p in sharded for v in trainer.fake_optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    trainable = trainer.generator_params + trainer.fake_params
    trainable_ids = {id(p) for p in trainable}
    base = [t for t in (*backend.unet.parameters(), *backend.unet.buffers()) if id(t) not in trainable_ids]
    parts = {
        "base": base,
        "trainable": trainable,
        "ema": list(trainer.generator_ema.values()) if trainer.generator_ema is not None else [],
        "optimizer": _optimizer_tensors(trainer.generator_optimizer) + _optimizer_tensors(trainer.fake_optimizer),
        "sharded": sharded,
        "sharded_state": sharded_state,
    }
    tracker = TensorMemory(scalars_as_one)
    tracker.track(*sharded, *sharded_state, scale=1 / shards)  # first: a storage is counted once
    tracker.track(*(t for tensors in parts.values() for t in tensors))
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.rescale(p.grad, 1 / shards)) for p in sharded]
    if sharded:
        hooks += [trainer.fake_optimizer.register_step_pre_hook(lambda *_: setattr(tracker, "new_scale", 1 / shards)),
                  trainer.fake_optimizer.register_step_post_hook(lambda *_: setattr(tracker, "new_scale", 1.0))]
    tracker.reset_peak()
    return tracker, parts, hooks


def measure_peak(run, steps: int) -> int:
    """Peak bytes of live tensors over ``steps`` iterations of a real ``TrainingRun`` (its
    own configuration, optimiser state primed first): the measurement the estimate is held to."""
    tracker, _, _ = _tracked(run.trainer, run.backend, scalars_as_one=False)
    with tracker:
        for _ in range(steps):
            run.trainer.step()
    return tracker.peak


def profile_iterations(run, config, scalars_as_one: bool = False, ema_on_device: bool = True, shards: int = 1) -> IterationProfile:
    """Profile a fresh ``run.TrainingRun`` built with ``profiling_config(config)``: optimiser
    state primed, then one generator-update iteration and one fake-score-only iteration,
    tracked and FLOP-counted. ``config`` is the run's own configuration: with ``grad_accum``
    > 1 the gradients held between micro-batches are added (an upper bound: the larger group
    in full), and so is the batch data of the other micro-batches (the trainer draws the whole
    batch at once: with Flux's 256 x 4096 T5 tokens, 4 MiB a condition). On fake tensors pass ``scalars_as_one``; ``ema_on_device=False`` leaves the
    moving average out (held on the CPU while the rest is on the GPU).

    ``shards`` > 1: the peak of one of that many processes that shard a full fake score
    (FSDP2, ``shard.shard_module``), from the same single-process run: what the fake score
    holds counted at 1/shards (``_tracked``), plus the blocks FSDP2 gathers at a time, modelled
    as 4x the largest unit (its gathered weights, the next one prefetched, its unsharded
    gradients and their reduce-scatter buffer) and 2x the root unit (the embeddings and the
    first and last convolutions, which stay gathered, with their gradients, through the
    forward and backward)."""
    trainer, backend = run.trainer, run.backend
    if trainer.config != profiling_config(trainer.config) or trainer.step_count:
        raise ValueError("profile a fresh run built with memory.profiling_config")
    tracker, parts, hooks = _tracked(trainer, backend, scalars_as_one, shards)

    flops = []
    with tracker:
        x_t = torch.zeros((1, *backend.latent_shape), device=backend.device)
        t = torch.full((1,), 500, dtype=torch.long, device=backend.device)
        batch = backend.sample_batch(config.batch_size)
        batch_data = _batch_bytes(batch) * (config.grad_accum - 1)
        cond = batch.cond[:1]
        with torch.no_grad():
            backend.raw(x_t, t, cond, None)
        unet_flops = tracker.flops
        del x_t, t, cond, batch
        tracker.reset_peak()
        for _ in range(2):
            tracker.flops = 0.0
            trainer.step()
            flops.append(tracker.flops)
    for hook in hooks:
        hook.remove()
    ema_bytes = _storages_bytes(parts["ema"])
    unsharded = (1 - 1 / shards) * _storages_bytes(parts["sharded"])  # what one process does not hold
    unsharded_state = (1 - 1 / shards) * _storages_bytes(parts["sharded_state"])
    transient = 0
    if parts["sharded"]:
        from .shard import unit_bytes

        largest, root = unit_bytes(backend.copies["fake_score"])
        transient = 4 * largest + 2 * root
    fake_grads = _storages_bytes(trainer.fake_params) - unsharded
    grads = int(max(_storages_bytes(trainer.generator_params), fake_grads)) if config.grad_accum > 1 else 0
    off_device = 0 if ema_on_device else ema_bytes
    return IterationProfile(
        peak=tracker.peak - off_device + grads + transient + batch_data,
        base_weights=_storages_bytes(parts["base"]),
        trainable=int(_storages_bytes(parts["trainable"]) - unsharded),
        gan_head=_storages_bytes(getattr(backend, "gan_head_parameters", list)()),
        ema=ema_bytes - off_device,
        optimizer_state=int(_storages_bytes(parts["optimizer"]) - unsharded_state),
        accumulated_gradients=grads,
        flops_generator_iteration=flops[0],
        flops_fake_iteration=flops[1],
        unet_forward_flops=unet_flops,
        samples=config.batch_size,
        fake_updates_per_generator_update=config.fake_updates_per_generator_update,
        shards=shards if parts["sharded"] else 1,
        unshard_transient=transient,
        batch_data=batch_data,
    )


# --- the estimate: the run's own code on fake tensors ---------------------------------------

# The frozen base's storage (``--base-dtype``): "fp8" holds its weights in float8 e4m3fn and
# computes each layer in the autocast dtype through ComfyUI's manual-cast layers (what ComfyUI
# does with an fp8 diffusion model: ``set_inference_dtype(float8_e4m3fn, bfloat16)``); "bf16"
# and "fp16" hold them in that dtype; "auto": fp8 where the file stores fp8 (as ComfyUI's
# ``unet_dtype`` keeps it), else the autocast dtype.
BASE_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# T5-XXL tokens of a Flux prompt: ComfyUI's Flux tokenizer pads to at least 256
# (comfy/text_encoders/flux.py, T5XXLTokenizer min_length=256); CLIP's 77 for the SD UNets.
FLUX_CONTEXT_TOKENS = 256


def header_model_config(tensors: dict):
    """ComfyUI's model config for a checkpoint's or a diffusion-model file's tensors (meta
    tensors: ``checkpoint.header_tensors``), found as ``comfy.sd.load_diffusion_model`` finds
    it: under the prefix most keys carry ("model.diffusion_model." in a checkpoint, none in a
    Flux file of models/diffusion_models). None when ComfyUI recognises no diffusion model."""
    import comfy.model_detection

    for prefix in dict.fromkeys(("model.diffusion_model.", comfy.model_detection.unet_prefix_from_state_dict(tensors), "")):
        keys = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if keys:
            model_config = comfy.model_detection.model_config_from_unet(keys, "")
            if model_config is not None:
                return model_config
    return None


def fp8_storage_supported(device) -> bool:
    """Whether ``device`` holds float8 tensors and casts them (CUDA of any generation and the CPU
    do; MPS does not). fp8 *compute* (Ada, Hopper) is not needed: each layer runs in bf16."""
    try:
        torch.zeros(1, dtype=torch.float8_e4m3fn, device=device).to(torch.bfloat16)
    except (RuntimeError, TypeError, AssertionError):
        return False
    return True


# Flux.1 [dev] trains at 1024 px, rank 32, in 29.8 GiB with a bf16 base and 18.9 GiB with an fp8
# one (docs/training.md, the full-size estimates): below this much GPU memory "auto" holds a Flux
# base in fp8.
FLUX_BF16_BASE_GIB = 40.0


def base_weight_dtype(base_dtype: str, compute: torch.dtype, device="cuda", file_dtype: torch.dtype | None = None,
                      arch: str | None = None, gpu_gib: float | None = None) -> tuple[torch.dtype, str | None]:
    """(storage dtype of the frozen base, one line to print or None) for ``--base-dtype``
    ("auto", "fp8", "bf16", "fp16", "fp32") with layers computed in ``compute`` on ``device``;
    ``file_dtype``: the weights' dtype in the file ("auto" keeps fp8 from an fp8 file). "auto"
    also holds a Flux.1 [dev] base (``arch``) in fp8 on a GPU of ``gpu_gib`` below
    ``FLUX_BF16_BASE_GIB``, where its bf16 base would not leave room to train (the line says so).

    fp8 on a device that cannot hold fp8 tensors falls back to bf16 storage (the same
    computation with twice the base's memory; the line says so) rather than refusing: the
    run is unchanged but for its memory, which ``--estimate`` shows."""
    if base_dtype not in ("auto", *BASE_DTYPES):
        raise ValueError(f"base dtype must be auto, {', '.join(BASE_DTYPES)}; got {base_dtype!r}")
    note = None
    if base_dtype == "auto":
        dtype = file_dtype if file_dtype in FP8_TYPES else compute
        if arch == "flux_dev" and dtype not in FP8_TYPES and gpu_gib is not None and gpu_gib < FLUX_BF16_BASE_GIB:
            dtype = torch.float8_e4m3fn
            note = (f"Flux.1 [dev] with a {str(compute).removeprefix('torch.')} base needs about 30 GiB to train at 1024 px: "
                    f"on {gpu_gib:.0f} GiB the base is held in fp8, computed in {str(compute).removeprefix('torch.')} "
                    "(--base-dtype bf16 keeps it)")
    else:
        dtype = BASE_DTYPES[base_dtype]
    if dtype in FP8_TYPES and not fp8_storage_supported(device):
        fallback = compute if compute != torch.float32 else torch.bfloat16
        return fallback, (f"fp8 base weights: {torch.device(device).type} cannot hold float8 tensors; the base is "
                          f"kept in {str(fallback).removeprefix('torch.')} instead (twice its memory)")
    return dtype, note


def set_base_dtype(model_config, dtype: torch.dtype, compute: torch.dtype) -> None:
    """Build ``model_config``'s model with weights in ``dtype``, computed in ``compute`` through
    ComfyUI's manual-cast layers where the two differ (as ``load_diffusion_model`` does)."""
    model_config.set_inference_dtype(dtype, None if dtype == compute else compute)


def header_dtype(tensors: dict) -> torch.dtype | None:
    """The dtype most of the file's weights are stored in (fp8, bf16, ...)."""
    import comfy.utils

    return comfy.utils.weight_dtype(tensors)


def estimate_run(path, run, config, resolution: int, gpu: bool = True, with_images: bool | None = None, world_size: int = 1,
                 base_dtype: str = "auto") -> IterationProfile:
    """What one training iteration of ``dmd2-train`` on checkpoint (or Flux diffusion-model
    file) ``path`` holds at its peak, on the GPU (``gpu``) or the CPU, without reading a weight:
    the model is built from the file's header (``estimate_model``). ``run``/``config``: the
    run's ``RunConfig`` and ``DMD2Config``; ``with_images`` (default: ``run.images`` set) turns
    the GAN term on; ``world_size``: the processes of the run (the per-GPU peak, a full fake
    score sharded over them unless ``run.shard_fake_score`` is off); ``base_dtype``: the
    frozen base's storage (``base_weight_dtype``)."""
    from ..comfy_env import ensure_comfy
    from .checkpoint import UnsupportedModel, header_tensors

    ensure_comfy()
    tensors = header_tensors(path)
    model_config = header_model_config(tensors)
    if model_config is None:
        raise UnsupportedModel(f"ComfyUI does not recognise a diffusion model in {path}")
    images = bool(run.images) if with_images is None else with_images
    return estimate_model(model_config, run, config, resolution, gpu, images, world_size, base_dtype=base_dtype,
                          file_dtype=header_dtype(tensors))


def target_settings(run, gpu: bool):
    """``run`` with what 'default' and 'auto' become on the GPU (``gpu``) or the CPU: bf16
    unless told otherwise (fp16 on a present GPU without bf16), checkpointing on for a GPU."""
    precision = run.mixed_precision
    if not precision:
        if gpu and torch.cuda.is_available():
            from .backend import default_precision

            precision = default_precision("cuda")
        else:
            precision = "bf16" if gpu else "no"
    checkpointing = run.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = "on" if gpu else "off"
    return dataclasses.replace(run, mixed_precision=precision, gradient_checkpointing=checkpointing)


def fake_conditioning(unet_config: dict, tokens: int | None = None):
    """A (1, ...) ``backend.Conditioning`` of the shapes the model takes: SD's CLIP context (77
    tokens) and ADM vector, Flux's T5 tokens (``FLUX_CONTEXT_TOKENS``) and pooled CLIP-L vector."""
    from .backend import Conditioning

    if "context_in_dim" in unet_config:  # Flux
        return Conditioning(torch.zeros(1, tokens or FLUX_CONTEXT_TOKENS, unet_config["context_in_dim"]),
                            torch.zeros(1, unet_config["vec_in_dim"]))
    adm = unet_config.get("adm_in_channels")
    return Conditioning(torch.zeros(1, tokens or 77, unet_config["context_dim"]), torch.zeros(1, adm) if adm else None)


def training_run(base, data, run, config, resolution: int, folder, device: str):
    """``run.TrainingRun`` on ``base`` with its latents of the model's own channel count (16 for
    Flux): the run builds SD's 4-channel latent shape; the rest of what it builds (the GAN
    head's token grid) reads only the latent's height and width."""
    from pathlib import Path

    from .run import TrainingRun

    training = TrainingRun(base, data, run, config, resolution, Path(folder), device=device)
    backend, channels = training.backend, base.latent_format.latent_channels
    if backend.latent_shape[0] != channels:
        backend.latent_shape = (channels, *backend.latent_shape[1:])
    return training


def estimate_model(model_config, run, config, resolution: int, gpu: bool, with_images: bool, world_size: int = 1,
                   base_dtype: str = "auto", file_dtype: torch.dtype | None = None) -> IterationProfile:
    """``profile_iterations`` of the run's own backend and trainer on a model of ComfyUI
    ``model_config`` (an SD UNet or a Flux transformer) made of fake tensors (no weights, no
    compute), with the settings the run would use on the GPU (``gpu``: bf16 unless told
    otherwise, gradient checkpointing on 'auto') or the CPU, simulated on fake CPU tensors under
    the same autocast; the base stored as ``base_dtype`` says (``base_weight_dtype``; fp8 as on
    a GPU, which every CUDA device holds)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .backend import TrainingData

    simulated = dataclasses.replace(target_settings(run, gpu), device="cpu")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[simulated.mixed_precision] if gpu else torch.float32
    dtype, _ = base_weight_dtype(base_dtype, compute, "cpu", file_dtype)
    set_base_dtype(model_config, dtype, compute)
    latent = resolution // 8
    channels = model_config.latent_format.latent_channels
    with FakeTensorMode():
        base = model_config.get_model({})
        cond = fake_conditioning(model_config.unet_config)
        # two of each: every value read from a fake tensor is 1 (a valid index)
        data = TrainingData([cond, cond], cond, real_latents=torch.zeros(2, channels, latent, latent) if with_images else None)
        training = training_run(base, data, simulated, profiling_config(config), resolution, ".", device="cpu")
        shards = world_size if run.fake_score == "full" and run.shard_fake_score else 1
        return profile_iterations(training, config, scalars_as_one=True, ema_on_device=not (gpu and config.ema_on_cpu), shards=shards)
