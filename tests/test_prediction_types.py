"""Distilling v-prediction and zero-terminal-SNR bases (#24, training side): the losses and
samplers against the papers' formulas written out here (not through ``bases``), every loss
and gradient finite at timestep 999 where alpha is exactly 0, the backend and ``dmd2-train``
on a tiny v-prediction ZTSNR SDXL, SD2.x loading, and the one-line refusals."""

from __future__ import annotations

import json
import math

import comfy.model_sampling
import comfy_extras.nodes_model_advanced as advanced
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.training import checkpoint as C
from comfyui_dmd2.training import cli, losses, sampling
from comfyui_dmd2.training.backend import SharedBaseBackend, TrainingData
from comfyui_dmd2.training.config import DMD2Config
from comfyui_dmd2.training.trainer import DMD2Trainer
from safetensors import safe_open
from test_cli import _args, _bad, inputs  # noqa: F401 (inputs: the fixture)

ABAR = bases.scaled_linear_alphas_cumprod()
ABAR_ZERO = bases.zero_terminal_snr(ABAR, terminal=0.0)  # diffusers' rescale: abar[999] = 0 exactly


def v_family(abar: torch.Tensor, zsnr: bool) -> bases.Family:
    return bases.get_family("sdxl", "v", zsnr).with_process(bases.DiscreteVP(abar))


def paper_x_t(x0, eps, abar_t):
    """DDPM: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    return math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps


def paper_v(x0, eps, abar_t):
    """Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    return math.sqrt(abar_t) * eps - math.sqrt(1 - abar_t) * x0


@pytest.mark.parametrize("abar", [ABAR, ABAR_ZERO], ids=["v", "v+zsnr"])
@pytest.mark.parametrize("step", [0, 249, 500, 999])
def test_v_conversions_and_fake_loss_match_the_paper(abar, step):
    family = v_family(abar, zsnr=abar is ABAR_ZERO)
    g = torch.Generator().manual_seed(step)
    x0, eps, x0_pred = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a = float(abar[step])
    t = torch.full((2,), step)
    x_t = paper_x_t(x0, eps, a)
    torch.testing.assert_close(family.add_noise(x0, eps, t), x_t)
    v = paper_v(x0, eps, a)
    torch.testing.assert_close(family.to_x0(x_t, v, t), x0)  # x0 = sqrt(abar) x_t - sqrt(1-abar) v
    torch.testing.assert_close(family.from_x0(x_t, x0, t), v)
    # The fake score's loss in the teacher's parameterization: |v_pred - v|^2 at the same x_t,
    # v_pred being the v that x0_pred implies (eps_pred = (x_t - sqrt(abar) x0_pred) / sqrt(1-abar)).
    eps_pred = (x_t - math.sqrt(a) * x0_pred) / math.sqrt(1 - a)
    v_pred = paper_v(x0_pred, eps_pred, a)
    expected = ((v_pred - v) ** 2).mean()
    assert losses.fake_score_loss(x0_pred, x0, t, family, "native").item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.fake_score_loss(x0_pred, x0, t, family, "v").item() == pytest.approx(expected.item(), rel=1e-5)
    # the eps weighting: abar / (1 - abar) of the x0 error (0 at zero terminal SNR, never inf)
    eps_weighted = (a / (1 - a) * (x0_pred - x0) ** 2).mean()
    assert losses.fake_score_loss(x0_pred, x0, t, family, "eps").item() == pytest.approx(eps_weighted.item(), rel=1e-5, abs=1e-12)


def test_samplers_step_like_the_paper_on_a_v_model():
    """DDIM (eta 0) and DMD2's sampler on a v-predicting function, against the same loops
    written with the DDPM/v formulas: x0 = sqrt(abar) x - sqrt(1-abar) v; DDIM re-noises with
    the eps that x0 implies, DMD2 with fresh noise."""
    family = v_family(ABAR_ZERO, zsnr=True)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def net_v(x, t):  # any function of (x, t) stands in for the UNet's v output
        return torch.einsum("oc,bchw->bohw", weight, x) * (1 + t.double()[:, None, None, None] / 1000)

    def x0_fn(x, t):
        return family.to_x0(x, net_v(x, t), t)

    steps = family.trailing_timesteps(4)
    assert steps == (999, 749, 499, 249)
    noise = [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in steps]

    x = noise[0]
    for i, s in enumerate(steps):  # DDIM by hand
        a = float(ABAR_ZERO[s])
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * net_v(x, torch.full((2,), s))
        if i + 1 == len(steps):
            break
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = paper_x_t(x0, eps, float(ABAR_ZERO[steps[i + 1]]))
    torch.testing.assert_close(sampling.ddim_sample(x0_fn, noise[0], steps, family), x0)

    x = noise[0]
    for i, s in enumerate(steps):  # DMD2 by hand
        a = float(ABAR_ZERO[s])
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * net_v(x, torch.full((2,), s))
        if i + 1 < len(steps):
            x = paper_x_t(x0, noise[i + 1], float(ABAR_ZERO[steps[i + 1]]))
    torch.testing.assert_close(sampling.dmd2_sample(x0_fn, noise, steps, family), x0)
    # at 999 with alpha = 0 the first x0 is -v: the unit noise only enters through the network
    t999 = torch.full((2,), 999)
    torch.testing.assert_close(x0_fn(noise[0], t999), -net_v(noise[0], t999))


def test_every_loss_and_gradient_is_finite_at_999_with_alpha_exactly_zero():
    """A v model at diffusers' zero terminal SNR (abar[999] = 0): the fake-score loss in each
    weighting, the DM loss and the GAN noising at t = 999 have finite values and gradients;
    the reference's eps form x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) is not even defined there."""
    family = v_family(ABAR_ZERO, zsnr=True)
    assert family.process.alphas_cumprod[999] == 0
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)  # the generator's sample
    t = torch.full((2,), 999)
    noise = torch.randn(2, 4, 8, 8)
    x_t = family.add_noise(x, noise, t)  # = noise at alpha 0
    x0_pred = family.to_x0(x_t, net(x_t), t)
    for weighting in ("native", "v", "eps", "x0"):
        net.zero_grad()
        loss = losses.fake_score_loss(x0_pred, x.detach(), t, family, weighting)
        loss.backward(retain_graph=True)
        assert torch.isfinite(loss), weighting
        assert all(torch.isfinite(p.grad).all() for p in net.parameters()), weighting
    with torch.no_grad():
        x0_real, x0_fake = family.to_x0(x_t, net(x_t), t), family.to_x0(x_t, 0.5 * net(x_t), t)
    loss_dm, grad = losses.distribution_matching_loss(x, x0_real, x0_fake)
    loss_dm.backward()
    assert torch.isfinite(loss_dm) and torch.isfinite(grad).all() and torch.isfinite(x.grad).all()
    eps_form = (x_t - (1 - ABAR_ZERO[999]).sqrt() * noise) / ABAR_ZERO[999].sqrt()
    assert not torch.isfinite(eps_form).all()


# --- the backend and dmd2-train on a tiny v-prediction, zero-terminal-SNR SDXL ---------------


@pytest.fixture(scope="module")
def vz_sdxl(tmp_path_factory):
    return tiny_models.save_checkpoint("sdxl", tmp_path_factory.mktemp("vz") / "tiny_sdxl_vz.safetensors", v_pred=True, ztsnr=True)


def test_backend_on_a_v_zsnr_sdxl_trains_with_finite_losses_and_v_guidance(vz_sdxl):
    loaded = C.load_checkpoint(vz_sdxl)
    family = loaded.family
    assert (family.name, family.sampling_label) == ("sdxl", "v + zsnr")
    assert C.peek_family(vz_sdxl).sampling_label == "v + zsnr"
    abar = family.process.alphas_cumprod
    assert abar[999].item() == 0.0  # x0 = -v there (ComfyUI's table keeps 4.9e-8 for a finite sigma)
    assert abar[998].item() == pytest.approx(bases.zero_terminal_snr(bases.scaled_linear_alphas_cumprod())[998].item(), rel=1e-5)
    conds = C.encode_prompts(loaded, ["", "a red cube", "blue sky"], 64)
    data = TrainingData(conds[1:], C.zero_conditioning(conds[0]))
    backend = SharedBaseBackend(loaded.model.model, data, (4, 8, 8), lora_rank=4, device="cpu", seed=0)
    assert backend.family.sampling_label == "v + zsnr"
    batch = backend.sample_batch(2)
    x_t = torch.randn(batch.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 400])
    with torch.no_grad():
        v_c, v_u = backend.raw(x_t, t, batch.cond, None), backend.raw(x_t, t, batch.uncond, None)
        real = backend.real_x0(x_t, t, batch.cond, batch.uncond, 4.0)
    a = abar[t].float().view(-1, 1, 1, 1)
    expected = a.sqrt() * x_t - (1 - a).sqrt() * (v_u + 4.0 * (v_c - v_u))  # CFG on v, then x0 from v
    torch.testing.assert_close(real, expected, rtol=1e-4, atol=1e-4)
    config = DMD2Config.for_arch("sdxl", steps=4, batch_size=2, grad_accum=1, fake_updates_per_generator_update=2, warmup_steps=0,
                                 dm_max_timestep=999, fake_min_timestep=990, real_guidance_scale=4.0)
    trainer = DMD2Trainer(config, backend)
    history = trainer.run(progress=False)
    keys = [k for row in history for k in ("loss_dm", "loss_fake", "grad_norm_generator", "grad_norm_fake") if k in row]
    assert {"loss_dm", "loss_fake", "grad_norm_generator"} <= set(keys)
    assert all(math.isfinite(row[k]) for row in history for k in row)
    backend.close()


def test_dmd2_train_on_a_v_zsnr_sdxl_records_the_sampling_and_refuses_another(vz_sdxl, tiny_checkpoints, inputs, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "vz"
    trainer, backend, _ = cli.train(_args(vz_sdxl, inputs, output, 2, "--save-every", "2", "--sample-every", "0"))
    assert trainer.step_count == 2 and backend.family.sampling_label == "v + zsnr"
    settings = json.loads((output / "checkpoints" / "step_0000002" / "settings.json").read_text())
    assert settings["sampling"] == "v + zsnr" and settings["fake_loss_weighting"] == "v"
    lora = output / "dmd2_tiny_sdxl_vz_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
    assert meta["dmd2_sampling"] == "v + zsnr" and meta["dmd2_arch"] == "sdxl"
    # ComfyUI's loader reads v_pred/ztsnr from the file: the workflow needs no sampling node
    assert "ModelSamplingDiscrete" not in (output / "workflow_api.json").read_text()
    trainer, _, _ = cli.train(_args(vz_sdxl, inputs, output, 3, "--sample-every", "0"))  # the same base resumes
    assert trainer.step_count == 3
    # an eps run's folder resumed on the v + zsnr base: refused naming the sampling, before loading
    eps_output = tmp_path / "eps"
    cli.train(_args(tiny_checkpoints["sdxl"], inputs, eps_output, 2, "--save-every", "2", "--sample-every", "0"))
    before = sorted(p.name for p in (eps_output / "checkpoints").iterdir())
    err = _bad(_args(vz_sdxl, inputs, eps_output, 3, "--sample-every", "0"), capsys, "sampling is 'v + zsnr' now but the saved run used 'eps'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (eps_output / "checkpoints").iterdir()) == before
    # an old run's settings without the key read as eps: refused the same way
    for path in (output / "checkpoints").glob("step_*/settings.json"):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "sampling"}))
    _bad(_args(vz_sdxl, inputs, output, 4, "--sample-every", "0"), capsys, "sampling is 'v + zsnr' now but the saved run used 'eps'")


# --- which models are accepted ------------------------------------------------------------


def _patched(model, sampling_class):
    """``model`` with ComfyUI's model_sampling replaced, as a sampling node does."""
    patched = model.clone()

    class Sampling(*sampling_class):
        pass

    ms = Sampling(model.model.model_config)
    patched.add_object_patch("model_sampling", ms)
    return patched


def test_eps_and_v_with_or_without_zsnr_are_accepted_through_the_patched_sampling():
    model = tiny_models.build_model("sd15")
    assert C.detect_family(model).sampling_label == "eps"
    for kind, zsnr in (("v_prediction", False), ("v_prediction", True)):
        (patched,) = advanced.ModelSamplingDiscrete().patch(model, kind, zsnr)
        family = C.detect_family(patched)
        assert family.prediction == ("v" if kind == "v_prediction" else "eps") and family.zsnr is zsnr
        assert (family.process.alphas_cumprod[-1].item() == 0.0) is zsnr  # x0 = -v at the last step
        assert C.detect_arch(patched) == "sd15"
    (patched,) = advanced.ModelSamplingDiscrete().patch(model, "eps", True)
    with pytest.raises(C.UnsupportedModel, match="eps prediction and zero terminal SNR") as info:
        C.detect_family(patched)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("classes", "named"), [
    ((comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.X0), "x0 prediction: that is a few-step student"),
    ((comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EPS), "ModelSamplingContinuousEDM"),
    ((comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST), "ModelSamplingDiscreteFlow"),
], ids=["x0", "edm", "flow"])
def test_x0_edm_and_flow_samplings_are_refused_in_one_line(classes, named):
    patched = _patched(tiny_models.build_model("sdxl"), classes)
    with pytest.raises(C.UnsupportedModel) as info:
        C.detect_family(patched)
    message = str(info.value)
    assert named in message and "\n" not in message


def test_sd2_v_checkpoint_loads_for_training_at_768(tmp_path):
    path = tiny_models.save_checkpoint("sd2", tmp_path / "tiny_sd2_v.safetensors", v_pred=True)
    assert C.peek_checkpoint(path) == ("checkpoint", "sd2")
    assert C.peek_family(path).sampling_label == "v"
    loaded = C.load_checkpoint(path)
    assert (loaded.arch, loaded.family.sampling_label) == ("sd2", "v")
    assert bases.default_resolution(loaded.family) == 768
    (cond,) = C.encode_prompts(loaded, ["a red cube"], 64)  # the OpenCLIP-H path
    assert cond.y is None and cond.context.shape[-1] == loaded.model.model.model_config.unet_config["context_dim"]
    eps_path = tiny_models.save_checkpoint("sd2", tmp_path / "tiny_sd2_eps.safetensors")
    assert C.peek_family(eps_path).sampling_label == C.load_checkpoint(eps_path).family.sampling_label == "eps"
    assert DMD2Config.for_arch("sd2", generator_timesteps="1-step").generator_timesteps == (999,)


def test_workflow_with_a_sampling_node_is_a_valid_graph():
    v = bases.get_family("sdxl", "v", True)
    assert cli.sampling_node(v, v) is None
    node = cli.sampling_node(v, bases.get_family("sdxl"))
    assert node == ("v_prediction", True)
    api = cli.workflow_api("base.safetensors", "lora.safetensors", "a cube", 1024, (999, 749, 499, 249), sampling=node)
    assert api["8"] == {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction", "zsnr": True}}
    assert api["2"]["inputs"]["model"] == ["8", 0]
    ui = cli.workflow_ui("base.safetensors", "lora.safetensors", "a cube", 1024, (999, 749, 499, 249), sampling=node)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == 8 and ui["last_link_id"] == len(ui["links"]) == 9
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:  # both ends name the link
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == kind
    assert nodes[8]["widgets_values"] == ["v_prediction", True]
    assert [n["type"] for n in ui["nodes"]].count("ModelSamplingDiscrete") == 1
