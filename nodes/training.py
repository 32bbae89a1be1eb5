"""DMD2TrainLoRA: distil the MODEL already in the graph into a few-step LoRA, in one queued graph.

The node runs the training path of ``dmd2-train`` (``training.run.TrainingRun``: LoRA G and
LoRA F on the frozen base, GAN head, moving average, resumable checkpoints, kohya export),
on the graph's MODEL (its weights are the frozen base: no second copy of the UNet), with the
prompts encoded by the graph's CLIP and real images by its VAE. ComfyUI's progress bar counts
iterations and shows the averaged generator's samples every ``preview_every`` iterations.

Interrupt stops after the current iteration with a checkpoint in
``output/dmd2_training/<lora name>/`` (not next to the LoRA: ComfyUI would list the
checkpoint's tensors among the LoRAs); queuing the same graph again resumes it, and a changed
setting that would change the trained tensors, or other prompts, images or captions, is refused
by name. Every refusal is raised when the node runs, none at validation: in a graph with other
outputs ComfyUI drops a branch that fails validation and reports the job as completed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import re
import time
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from .. import bases
from ..training import checkpoint as C
from ..training.config import ARCH_DEFAULTS, ConfigError, DMD2Config, with_fake_score_rate
from ..training.data import check_resolution, data_fingerprints, prompt_lines
from ..training.lora import TARGET_SETS, LoRAError, check_init_arch, read_init_lora
from ..training.run import (
    DATA_KEYS,
    ONE_STEP_LAYOUT,
    RunConfig,
    Stopped,
    TrainingRun,
    adopt_init_lora,
    draw_loss_curves,
    find_latest_checkpoint,
    image_grid,
    init_settings,
    one_step_layout,
    resume_mismatch,
    resume_settings,
    saved_settings,
)
from .families import DMD2_FOUR_STEP, DMD2_ONE_STEP
from .releases import Release, tag_release
from .schedules import CUSTOM, custom_timesteps_input, timesteps_for_preset

RUNS_FOLDER = "dmd2_training"  # under ComfyUI's output directory
NO_INIT_LORA = "none"
AUTO = "auto"  # fake_score / lora_targets (and fake_score_rank 0): the layout run.one_step_layout picks
LAYOUT_HINT = "dmd2-train --estimate gives yours; the fake_score, fake_score_rank and lora_targets inputs choose another layout"
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]*$")
log = logging.getLogger(__name__)


class TrainingInputError(ValueError):
    """An input of DMD2TrainLoRA that cannot be trained on; the message says which and why."""


def check_lora_name(name: str) -> str:
    """The file name (``<name>.safetensors``, folders joined by '/') for a LoRA name typed in
    the node: a plain name, or one in a subfolder of models/loras (``sub/name``, as ComfyUI
    lists LoRAs kept in subfolders); never ``..``, an absolute path or an empty folder name."""
    stem = name.strip().removesuffix(".safetensors")
    parts = stem.replace("\\", "/").split("/")
    if ".." in stem or not all(LORA_NAME.match(part) for part in parts):
        raise TrainingInputError(
            f"lora_name {name!r} is not a name in models/loras: use letters, digits, spaces, '.', '_', '+' or '-', "
            "optionally in subfolders (sub/name), without '..' or a leading '/'"
        )
    return "/".join(parts) + ".safetensors"


def free_name(stem: str, taken) -> str:
    """``stem_2``, ``stem_3``, ...: the first name ``taken`` (a LoRA or a run of that name
    exists) says is free, offered in a refusal so that a new run is one edit away."""
    return next(f"{stem}_{i}" for i in range(2, 10_000) if not taken(f"{stem}_{i}"))


def _shown(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value) if value is not None else "none"


def resume_refusal(stem: str, step: int, total: int, key: str, now, saved, suggestion: str) -> str:
    """One line for a queued run whose name belongs to a run with other settings: which run,
    how far it got, what differs, and the two ways on (set it back, or a new name). Said as
    "a run named X exists" because a finished run is not resumed but re-exported."""
    where = f"{RUNS_FOLDER}/{stem} in the output folder, {'finished' if step >= total else 'stopped'} at step {step}"
    if key in DATA_KEYS:
        differs = f"trained on other {key} ({_shown(saved)}; now {_shown(now)})"
        back = f"set the {key} back"
    elif key == "sampling":  # the base's prediction type and terminal SNR (issue #24)
        differs = f"on a base with sampling {saved}; this graph's MODEL has sampling {now}"
        back = (f"give the MODEL the sampling {saved} again (the checkpoint it was trained on, or a ModelSamplingDiscrete node "
                "with that sampling and zsnr)")
    else:
        differs = f"with {key} {_shown(saved)}; this graph has {key} {_shown(now)}"
        back = f"set {key} back to {_shown(saved)}"
        if key == "fake_score" and isinstance(saved, dict):  # a LoRA F: two inputs (rank 0 is auto, not lora_rank)
            back = f"set fake_score to lora and fake_score_rank to {saved['rank']}"
    return (f"a run named {stem!r} exists ({where}) {differs}. To continue it, {back}; for a new run, choose another "
            f"lora_name (e.g. {suggestion!r})")


def base_fingerprint(model) -> str:
    """A cheap identity of the base UNet's weights (a resume on another model is refused).
    Read it with no other model loaded (``unpatched_base_fingerprint``)."""
    digest = hashlib.sha256()
    params = list(model.model.diffusion_model.state_dict().items())
    for key, value in params[:4] + params[-4:]:
        digest.update(key.encode())
        digest.update(repr(round(float(value.detach().double().sum()), 6)).encode())
    digest.update(str(sum(v.numel() for _, v in params)).encode())
    return digest.hexdigest()[:16]


def unpatched_base_fingerprint(model) -> str:
    """``base_fingerprint`` of the weights as the checkpoint has them. ComfyUI applies a
    LoRA by writing it into the shared weights while the patched clone is loaded (the sampler
    of an earlier graph, for instance) and writes them back when it unloads: unloading every
    model first makes the fingerprint, and the training after it, see the base's own weights."""
    comfy.model_management.unload_all_models()
    return base_fingerprint(model)


# The predictions the trainer distils (bases.PREDICTIONS also has x0: no SD checkpoint is
# trained that way, and ModelSamplingDiscrete's 'x0' on one would misread its output).
TRAINABLE_PREDICTIONS = ("eps", "v")


def model_family(model) -> bases.Family:
    """The MODEL's family on its own, patched sampling (``bases.family_of``): eps or v
    prediction, with or without zero terminal SNR, read from the checkpoint's keys or from a
    ModelSamplingDiscrete node in front alike. Refused in one line, naming what was found:
    another model family, another prediction type ('x0', 'lcm'), a continuous EDM or flow
    sampling, a sigma table other than SD's (zero-terminal-SNR) schedule, an inpainting UNet.
    A Flux.1 [dev] MODEL is its family on its own flow sampling (``checkpoint.detect_family``:
    [schnell] is refused there, being already distilled)."""
    try:
        flow = bases.family_of(model).prediction == "flow"
    except bases.FamilyError:
        flow = False
    if flow:
        try:
            return C.detect_family(model)
        except C.UnsupportedModel as exc:
            raise TrainingInputError(str(exc)) from None
    try:
        bases.arch_of(model.model)
    except bases.FamilyError as exc:
        raise TrainingInputError(str(exc)) from None
    try:
        family = bases.family_of(model)
    except bases.FamilyError as exc:
        raise TrainingInputError(f"{exc}; DMD2TrainLoRA distils eps- and v-prediction models (the checkpoint's own sampling, "
                                 "or a ModelSamplingDiscrete node set to eps or v_prediction)") from None
    sampling = model.get_model_object("model_sampling")
    found = f"{type(sampling).__name__} ({', '.join(c.__name__ for c in type(sampling).__mro__[1:3])})"
    if family.prediction not in TRAINABLE_PREDICTIONS:
        raise TrainingInputError(
            f"the MODEL samples with {family.prediction} prediction ({found}, e.g. a ModelSamplingDiscrete node set to "
            f"'{family.prediction}'): DMD2TrainLoRA distils eps- and v-prediction models; set the node to eps or v_prediction, "
            "or connect the checkpoint loader's MODEL directly"
        )
    if family.zsnr and family.prediction == "eps":
        raise TrainingInputError(C.ZSNR_EPS_REFUSAL.format(name="the MODEL"))
    own = family.process.alphas_cumprod
    standard = bases.get_family(family.name, family.prediction, family.zsnr).process.alphas_cumprod
    if own.shape != standard.shape or not torch.allclose(own, standard, rtol=1e-4, atol=0):
        sigmas = family.process.sigmas
        raise TrainingInputError(
            f"the MODEL's sigma table ({found}: {len(sigmas)} steps, sigma {float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}) "
            f"is not {family.label}'s {'zero-terminal-SNR ' if family.zsnr else ''}schedule: DMD2TrainLoRA distils the "
            "checkpoint's own schedule (its keys, or a ModelSamplingDiscrete node with eps/v_prediction and zsnr)"
        )
    in_channels = model.model.model_config.unet_config.get("in_channels", 4)
    if in_channels != 4:
        raise TrainingInputError(f"the MODEL's UNet has {in_channels} input channels: inpainting and instruct models are not supported")
    return family


def make_normal_tensors(module: torch.nn.Module) -> None:
    """ComfyUI executes graphs under ``torch.inference_mode``: weights loaded there are
    inference tensors, which autograd cannot save for backward. Replace them by ordinary
    tensors with the same values (once; other nodes see the same weights)."""
    with torch.no_grad():
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and param.is_inference():
                    owner._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    owner._buffers[name] = buffer.clone()


@contextlib.contextmanager
def interrupts_at_iteration_boundaries():
    """ComfyUI checks for Interrupt inside every layer's forward (``comfy.ops``) and raises
    there, which would leave an iteration half done (some optimisers stepped, others not).
    While training, that check is deferred: the flag stays set and the loop reads it after the
    current iteration, saves a checkpoint and then raises ComfyUI's interrupt itself."""
    check = comfy.model_management.throw_exception_if_processing_interrupted
    comfy.model_management.throw_exception_if_processing_interrupted = lambda: None
    try:
        yield
    finally:
        comfy.model_management.throw_exception_if_processing_interrupted = check


def resolve_layout(run: RunConfig, arch: str, timesteps, fake_score: str, fake_score_rank: int,
                   lora_targets: str) -> tuple[RunConfig, str | None]:
    """The run with the node's layout inputs. A value is kept as given; ``auto`` (rank 0) is
    left to ``run.one_step_layout`` as an unset option is in ``dmd2-train``: the 1-step layout
    for a one-timestep SD1.5/SDXL student, else the reference's (LoRA F at lora_rank, the DMD2
    list: what the node's old defaults trained, so their runs resume). Also returns the line
    that says which 1-step layout was taken (None otherwise)."""
    widgets = {"fake_score": fake_score, "fake_score_rank": fake_score_rank, "lora_targets": lora_targets}
    given = {key for key, value in widgets.items() if value not in (AUTO, 0)}
    default = RunConfig()
    run = dataclasses.replace(run, fake_score=fake_score if "fake_score" in given else default.fake_score,
                              fake_score_rank=fake_score_rank,
                              lora_targets=(lora_targets,) if "lora_targets" in given else default.lora_targets)
    return one_step_layout(run, arch, timesteps, given, hint=LAYOUT_HINT)


def train_lora(model, clip, vae, prompts: str, lora_name: str, preset: str, custom_timesteps: str, steps: int, seed: int,
               lora_rank: int, lora_alpha: float, lr_generator: float, lr_fake_score: float, real_guidance_scale: float,
               resolution: int, batch_size: int, grad_accum: int, warmup_steps: int, regression_steps: int, preview_every: int,
               save_every: int, images: torch.Tensor | None = None, captions: str = "", fake_score: str = AUTO,
               fake_score_rank: int = 0, lora_targets: str = AUTO, init_lora: str = NO_INIT_LORA, regression_pairs: int = 0,
               progress=None, status=None):
    """Train (or resume) the run ``lora_name`` on the graph's model; returns (MODEL with the
    LoRA applied, LoRA file name, loss plot IMAGE). Raises TrainingInputError/ConfigError on
    bad input and ComfyUI's InterruptProcessingException after saving on Interrupt.
    ``fake_score``, ``fake_score_rank``, ``lora_targets``: as ``dmd2-train``'s options of the
    same names, ``auto`` (rank 0) as the command's unset option (``resolve_layout``, said in the
    status); with a full fake score, ``lr_fake_score`` left at the LoRA default becomes the
    reference's full-network rate, as the command's default does. ``init_lora``: a name in
    models/loras the generator starts from (``dmd2-train --init-lora``), or "none".
    ``regression_pairs``: ``dmd2-train --regression-pairs`` (a pool of teacher pairs built once
    in the run folder for the warm start; 0: fresh pairs).
    ``status(text)``: one line of where the run stands (starting or resuming, rate and time
    left, a checkpoint saved on Interrupt), shown on the node; also logged."""
    say = status_reporter(status)
    file_name = check_lora_name(lora_name)
    prompt_list = prompt_lines(prompts or "")
    if not prompt_list:
        raise TrainingInputError("prompts is empty: write one training prompt per line")
    caption_list = [line.strip() for line in (captions or "").splitlines()] if captions and captions.strip() else []
    if images is not None and caption_list and len(caption_list) != len(images):
        raise TrainingInputError(
            f"captions has {len(caption_list)} lines for {len(images)} images: give one caption per image, in order "
            "(an empty line for an image without one), or none at all"
        )
    family = model_family(model)
    arch = family.name
    if model.patches:
        raise TrainingInputError(
            f"the MODEL carries patches on {len(model.patches)} weights (a LoRA or another patch applied before this node): "
            "DMD2TrainLoRA trains on the base model, so connect the checkpoint loader's MODEL directly"
        )
    timesteps = timesteps_for_preset(preset, custom_timesteps, family.process.num_train_timesteps)  # Flux: its 1000-step flow grid
    if preset == DMD2_ONE_STEP and family.prediction == "flow":
        # A flow student's one step starts from pure noise (t = 1, grid index 999): the time its
        # sampler feeds it (DMD2 Generate's flow 1-step preset) and the command's 1-step preset.
        timesteps = [family.one_step_timestep]
        say(f"{DMD2_ONE_STEP} on {family.label}: trained at 999 (t = 1, pure noise), the flow 1-step time", log_it=True)
    values = dict(steps=steps, seed=seed, generator_timesteps=tuple(timesteps), lr_generator=lr_generator,
                  lr_fake_score=lr_fake_score, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps,
                  regression_steps=regression_steps, regression_pairs=regression_pairs)
    if real_guidance_scale > 0:
        values["real_guidance_scale"] = real_guidance_scale
    config = DMD2Config.for_arch(arch, **values)
    if config.steps < 1:
        raise TrainingInputError("steps must be >= 1")
    resolution = check_resolution(resolution or bases.default_resolution(family))
    stem = file_name.removesuffix(".safetensors")
    runs = Path(folder_paths.get_output_directory()) / RUNS_FOLDER
    folder = runs / stem
    run = RunConfig(checkpoint="(the graph's MODEL)", prompts="(the node's prompts)", output=str(folder), resolution=resolution,
                    lora_rank=lora_rank, lora_alpha=lora_alpha, lora_name=file_name, save_every=save_every,
                    sample_every=preview_every, keep_checkpoints=1)
    init = None
    if init_lora and init_lora != NO_INIT_LORA:
        if init_lora == file_name:
            raise TrainingInputError(f"init_lora {init_lora} is the LoRA this run writes: choose another lora_name, or another init_lora")
        init = read_init_lora(folder_paths.get_full_path_or_raise("loras", init_lora))
        check_init_arch(init, model.model.model_config.unet_config.get("context_dim"), f"the MODEL ({family.label})",
                        flux_model=family.prediction == "flow")
        run = adopt_init_lora(run, init, lambda text: say(text, log_it=True, toast=True))
    run, layout = resolve_layout(run, arch, timesteps, fake_score, fake_score_rank, lora_targets)  # after the init's rank, as the command
    if layout is not None:
        say(layout, log_it=True, toast=True)
    config = with_fake_score_rate(config, run.fake_score, rate_given=lr_fake_score != _defaults("lr_fake_score"))
    run.validate()
    # The data is part of what a resume must match. Edited prompts under the same name are
    # refused (naming them), not started as a new run under another name: the user chose the
    # name, the LoRA loaders downstream read that file, and continuing with more prompts is
    # also a plausible intent; the refusal says both ways on and offers a free name.
    data = data_fingerprints(prompt_list, None if images is None else (image_bytes(image) for image in images),
                             caption_list if images is not None else ())
    base = {"base_model_fingerprint": unpatched_base_fingerprint(model)} | data  # (unloads the other models)
    settings = resume_settings(run, config, resolution, family) | init_settings(run, init) | base
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    lora_path = loras / file_name
    latest = find_latest_checkpoint(folder / "checkpoints")
    if latest is not None:
        mismatch = resume_mismatch(saved_settings(latest), settings)
        if mismatch is not None:
            def taken(name: str) -> bool:
                return (loras / f"{name}.safetensors").exists() or (runs / name).exists()

            step = int(latest.name.removeprefix("step_"))
            raise TrainingInputError(resume_refusal(stem, step, config.total_steps, *mismatch, free_name(stem, taken)))
    elif lora_path.exists():
        raise TrainingInputError(f"a LoRA named {file_name} already exists in models/loras and no run of this node made it: choose another lora_name")

    device = comfy.model_management.get_torch_device()
    comfy.model_management.load_models_gpu([model], memory_required=0, force_full_load=True)
    training = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            make_normal_tensors(model.model.diffusion_model)
            loaded = C.LoadedCheckpoint(path=None, family=family, model=model, clip=clip, vae=vae)
            texts = C.RunTexts(prompt_list, prompt_list[:4], [c or None for c in caption_list] if images is not None else [])
            real_latents = None if images is None else C.encode_image_batch(loaded, images, resolution)
            data, sample_conds = texts.split(C.encode_prompts(loaded, texts.all(), resolution), real_latents, config.uncond)

            training = TrainingRun(model.model, data, run, config, resolution, folder, str(device), extra_settings=base, init_lora=init,
                                   family=family)  # read before loading: model.model holds the patched sampling only while loaded
            start = training.resume(latest)
            total = config.total_steps
            bar = progress or comfy.utils.ProgressBar(total)
            bar.update_absolute(start, total)
            seeds = list(range(len(sample_conds)))
            say(f"resuming at step {start} of {total}" if start else f"starting a new run of {total} steps", log_it=True)
            pace = Pace(start, total)

            def show(metrics: dict) -> None:
                bar.update_absolute(int(metrics["step"]) + 1, total)
                line = pace.line(int(metrics["step"]) + 1, metrics)
                if line is not None:
                    say(line, log_it=pace.log_due())

            def preview(step: int) -> None:
                images_out = C.decode_latents(loaded, training.sample(sample_conds, seeds))
                bar.update_absolute(step, total, ("JPEG", image_grid(images_out, labels=texts.sample_prompts, title=f"step {step}/{total}"), 512))

            def interrupted():
                # Read, not raised: ComfyUI's own check (also in the progress hook) is deferred.
                return "interrupt" if comfy.model_management.processing_interrupted() else None

            try:
                with interrupts_at_iteration_boundaries():
                    training.train(on_step=show, on_samples=preview, stop=interrupted, say=lambda text: say(text, log_it=True))
            except Stopped as stop:
                comfy.model_management.interrupt_current_processing(False)
                if training.trainer.pool is None and config.regression_pairs and stop.step < config.regression_steps:
                    say(f"stopped while building the regression pool: the pairs made so far are in {RUNS_FOLDER}/{stem} "
                        "(output folder); Run the same graph again to continue", log_it=True, toast=True)
                else:
                    say(f"stopped: checkpoint saved at step {stop.step} of {total} in {RUNS_FOLDER}/{stem} (output folder); "
                        "Run the same graph again to resume", log_it=True, toast=True)
                raise comfy.model_management.InterruptProcessingException() from None
            training.export(lora_path, training.lora_metadata("(the graph's MODEL)", "", arch))
            plot = draw_loss_curves(training.metrics_log.rows)
    finally:
        if training is not None:
            training.close()
        training = None
        gc.collect()
        comfy.model_management.soft_empty_cache()

    lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    patched = tag_release(patched, trained_release(file_name, family, timesteps))
    import numpy as np

    plot_image = torch.from_numpy(np.asarray(plot.convert("RGB"), dtype=np.float32) / 255.0)[None]
    return patched, file_name, plot_image


def trained_release(file_name: str, family: bases.Family, timesteps) -> Release:
    """The trained LoRA as a release of the DMD2 family on the node's MODEL output: DMD2
    Generate then notes a preset with another step count or family than the one trained,
    and knows the sampling (prediction type, zero terminal SNR) it was distilled on."""
    return Release(file_name, "", family.name, "lora", tuple(timesteps), "fp32", "kohya", "", repo_id="",
                   note=f"trained by DMD2 Train LoRA (sampling {family.sampling_label})", prediction=family.prediction,
                   zsnr=family.zsnr)


def status_reporter(status):
    """say(text, log_it, toast): the node's status line to ``status`` (the frontend's progress
    text under the node), to the server's console when ``log_it``, and as a toast when ``toast``
    (web/dmd2.js shows the pack's 'dmd2.toast' events)."""

    def say(text: str, log_it: bool = False, toast: bool = False) -> None:
        if log_it:
            log.info("DMD2TrainLoRA: %s", text)
        if status is not None:
            status(text, toast)

    return say


def frontend_status(node_id):
    """``status`` for ``train_lora`` in a running server: ComfyUI's progress text on the node,
    and the pack's toast event; nothing without a server (tests, scripts)."""

    def send(text: str, toast: bool = False) -> None:
        try:
            from server import PromptServer
        except ImportError:
            return
        server = PromptServer.instance
        if server is None or node_id is None:
            return
        server.send_progress_text(text, node_id)
        if toast:
            server.send_sync("dmd2.toast", {"severity": "info", "summary": "DMD2 Train LoRA", "detail": text}, server.client_id)

    return send


class Pace:
    """Iterations per second and the time left, as a status line at most every ``every``
    seconds (a line per iteration would flood the websocket and the console)."""

    def __init__(self, start: int, total: int, every: float = 2.0, log_every: float = 30.0):
        self.start, self.total, self.every, self.log_every = start, total, every, log_every
        self.began = self.shown = self.logged = time.monotonic()

    def line(self, step: int, metrics: dict) -> str | None:
        now = time.monotonic()
        if now - self.shown < self.every and step < self.total:
            return None
        self.shown = now
        rate = (step - self.start) / max(now - self.began, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        losses = ", ".join(f"{k} {metrics[k]:.3g}" for k in ("loss_dm", "loss_fake", "loss_regression") if k in metrics)
        return f"step {step}/{self.total}, {rate:.2f} it/s, {format_duration(left)} left" + (f"; {losses}" if losses else "")

    def log_due(self) -> bool:
        now = time.monotonic()
        if now - self.logged < self.log_every:
            return False
        self.logged = now
        return True


def format_duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def run_summary(file_name: str, total: int) -> str:
    """The node's note after a run: where the LoRA and the run's files are, and that loader
    lists show a new file only after the node definitions are refreshed (stock ComfyUI)."""
    stem = file_name.removesuffix(".safetensors")
    return (f"Saved models/loras/{file_name} ({total} steps). Loader lists show a new LoRA after a refresh of the node "
            f"definitions (press R). Run folder: {RUNS_FOLDER}/{stem} in the output folder: loss_curve.png, metrics.csv, "
            "checkpoints/.")


def image_bytes(image: torch.Tensor) -> bytes:
    """An IMAGE's pixels as 8-bit RGB bytes (its fingerprint: what the VAE encodes)."""
    return image.mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().tobytes() + str(tuple(image.shape)).encode()


def one_step_words(key: str, unit: str = "") -> str:
    """``ONE_STEP_LAYOUT``'s ``key`` for each architecture, as the layout inputs' tooltips say it."""
    def shown(value) -> str:
        return ",".join(value) if isinstance(value, tuple) else str(value)

    return ", ".join(f"{shown(layout[key])}{unit} on {bases.get_family(arch).label}" for arch, layout in ONE_STEP_LAYOUT.items())


def _defaults(key: str):
    return ARCH_DEFAULTS["sdxl"].get(key, getattr(DMD2Config(), key))


class DMD2TrainLoRA(io.ComfyNode):
    """Distil the MODEL in the graph into a few-step DMD2 LoRA (the ``dmd2-train`` path)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        config = DMD2Config()
        return io.Schema(
            node_id="DMD2TrainLoRA",
            display_name="DMD2 Train LoRA",
            category="DMD2/training",
            description="Distil the connected SD1.5/SD2.x/SDXL model (eps or v-prediction, with or without zero terminal SNR) "
                        "into a few-step DMD2 LoRA (the same training as the dmd2-train command), save it in models/loras "
                        "and output the model with it applied. Interrupt saves a checkpoint; queue the same graph again to resume.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5, SD2.x or SDXL model to distil, straight from the checkpoint loader: its "
                                                "weights are the frozen base (no copy is made). eps or v-prediction, with or "
                                                "without zero terminal SNR: as the checkpoint's keys say (v_pred, ztsnr), or set "
                                                "by a ModelSamplingDiscrete node (eps / v_prediction, zsnr) in between. The LoRA "
                                                "records the sampling; a resume on another one is refused."),
                io.Clip.Input("clip", tooltip="The model's text encoder: encodes the prompts and captions once."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the real images and decodes the previews."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Training prompts, one per line (# lines are skipped). The first four are previewed."),
                io.String.Input("lora_name", default="dmd2_my_model_lora",
                                tooltip="File name in models/loras, optionally in a subfolder (sub/name). The same name with the same "
                                        "settings and data resumes an interrupted run; other settings, prompts or images "
                                        "are refused by name (choose another name for a new run)."),
                io.Combo.Input("preset", options=[DMD2_FOUR_STEP, DMD2_ONE_STEP, CUSTOM], default=DMD2_FOUR_STEP,
                               tooltip="The timesteps the student is trained for (DMD2's backward simulation): 4-step "
                                       "(999,749,499,249), 1-step (399, the SDXL reference; SD1.5's used 999: custom) or "
                                       "'custom'. Sample the LoRA at the same timesteps (DMD2 Generate warns otherwise)."),
                custom_timesteps_input(),
                io.Int.Input("steps", default=config.steps, min=1, max=1_000_000,
                             tooltip="DMD2 iterations (the reference: 10000). The generator is updated every "
                                     "fake-score ratio-th iteration (5 for SDXL, 10 for SD1.5)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Random seed of the adapters' initialisation and every draw of the run."),
                io.Int.Input("lora_rank", default=RunConfig().lora_rank, min=1, max=512, tooltip="Rank of the generator and fake-score LoRAs."),
                io.Float.Input("lora_alpha", default=RunConfig().lora_alpha, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha: the update is scaled by alpha/rank."),
                io.Float.Input("lr_generator", default=_defaults("lr_generator"), min=1e-8, max=1e-2, step=1e-6, round=False,
                               tooltip="The generator's learning rate (reference: 5e-5)."),
                io.Float.Input("lr_fake_score", default=_defaults("lr_fake_score"), min=1e-8, max=1e-2, step=1e-6, round=False,
                               tooltip="The fake score's learning rate (10x the generator's, from the digits study). "
                                       "Left at this default with fake_score full, it becomes the reference's full-network rate."),
                io.Float.Input("real_guidance_scale", default=0.0, min=0.0, max=30.0, step=0.05,
                               tooltip="Guidance of the real score; 0: the reference's value for the architecture (8 for SDXL, 1.75 for SD1.5)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8,
                             tooltip="Training image side; 0: the model's default: 1024 for SDXL, 512 for SD1.5 (768 for SD2.x v-prediction)."),
                io.Int.Input("batch_size", default=config.batch_size, min=1, max=64, tooltip="Samples per micro-batch."),
                io.Int.Input("grad_accum", default=config.grad_accum, min=1, max=256, tooltip="Micro-batches accumulated per update."),
                io.Int.Input("warmup_steps", default=config.warmup_steps, min=0, max=100_000,
                             tooltip="Iterations of linear learning-rate warmup for both optimisers (reference: 500)."),
                io.Int.Input("regression_steps", default=0, min=0, max=100_000,
                             tooltip="Regression warm-start iterations before DMD2 (helps 1-step students)."),
                io.Int.Input("preview_every", default=100, min=0, max=100_000,
                             tooltip="Iterations between previews of the generator's samples (0: only at the end)."),
                io.Int.Input("save_every", default=RunConfig().save_every, min=1, max=100_000,
                             tooltip="Iterations between resumable checkpoints (an Interrupt also saves one)."),
                io.Image.Input("images", optional=True, tooltip="Real images for the GAN term (optional)."),
                io.String.Input("captions", multiline=True, optional=True, default="",
                                tooltip="One caption per real image, in order (optional; an empty line: no caption)."),
                io.Combo.Input("fake_score", options=[AUTO, "lora", "full"], default=AUTO, optional=True,
                               tooltip=f"auto: for a 1-step student (one timestep) the 1-step layout's ({one_step_words('fake_score')}), "
                                       "else lora; the node's status says what it took. lora: the fake score is a LoRA on the "
                                       "shared base. full: a trained fp32 copy of the UNet, as in the paper (16 bytes per UNet "
                                       "parameter more: about 14 GB for SD1.5, 41 GB for SDXL); better 1-step students "
                                       "(docs/training.md). With full, an lr_fake_score left at its default becomes 5e-5 (SDXL) "
                                       "/ 2.5e-5 (SD1.5)."),
                io.Int.Input("fake_score_rank", default=0, min=0, max=1024, optional=True,
                             tooltip="The fake score LoRA's own rank: more capacity for the fake score without a larger "
                                     "exported LoRA. 0: auto: for a 1-step student with a LoRA fake score the 1-step "
                                     f"layout's ({one_step_words('fake_score_rank_x', 'x lora_rank')}), else lora_rank."),
                io.Combo.Input("lora_targets", options=[AUTO, *TARGET_SETS], default=AUTO, optional=True,
                               tooltip=f"Layers the LoRAs adapt. auto: for a 1-step student the 1-step layout's "
                                       f"({one_step_words('lora_targets')}), else dmd2. dmd2: the reference's attention, "
                                       "feed-forward and res-block layers. all: also the input/output convolutions and the time "
                                       "and class embeddings (ComfyUI's LoRA loaders read them too); it helped 1-step students "
                                       "on the digits."),
                io.Combo.Input("init_lora", options=[NO_INIT_LORA, *folder_paths.get_filename_list("loras")], default=NO_INIT_LORA,
                               optional=True,
                               tooltip="Start the generator from this few-step LoRA instead of zero, e.g. the DMD2 4-step LoRA "
                                       "when distilling a finetune (its rank and alpha are taken). The saved LoRA is the whole "
                                       "adapter: load it alone. none: start from zero."),
                io.Int.Input("regression_pairs", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="With regression_steps: a pool of this many teacher pairs, built once in the run folder "
                                     "(resumable) and reused by every warm-start iteration, instead of running the teacher "
                                     "for every sample (the reference: 10,000 pairs, each reused about 50 times). 0: fresh pairs."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained LoRA applied (sample it with DMD2 Generate)."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA's file name in models/loras."),
                io.Image.Output(display_name="loss_plot", tooltip="The training losses and the discriminator's logits."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, lora_name, preset, custom_timesteps, steps, seed, lora_rank, lora_alpha,
                lr_generator, lr_fake_score, real_guidance_scale, resolution, batch_size, grad_accum, warmup_steps,
                regression_steps, preview_every, save_every, images=None, captions="", fake_score=AUTO, fake_score_rank=0,
                lora_targets=AUTO, init_lora=NO_INIT_LORA, regression_pairs=0) -> io.NodeOutput:
        try:
            patched, name, plot = train_lora(
                model, clip, vae, prompts, lora_name, preset, custom_timesteps, steps, seed, lora_rank, lora_alpha,
                lr_generator, lr_fake_score, real_guidance_scale, resolution, batch_size, grad_accum, warmup_steps,
                regression_steps, preview_every, save_every, images=images, captions=captions, fake_score=fake_score,
                fake_score_rank=fake_score_rank, lora_targets=lora_targets, init_lora=init_lora, regression_pairs=regression_pairs,
                status=frontend_status(getattr(cls.hidden, "unique_id", None)),
            )
        except LoRAError as exc:  # an init LoRA that is no LoRA, or made for another model
            raise TrainingInputError(str(exc)) from None
        except ConfigError as exc:  # a resume with changed settings, a value out of range
            raise TrainingInputError(str(exc).replace("--no-resume or another --output", "another lora_name")) from None
        return io.NodeOutput(patched, name, plot, ui={"text": [run_summary(name, steps + regression_steps)]})


NODE_CLASSES = [DMD2TrainLoRA]
