"""The flow trainer's toy proof (#25): the digits teacher built from ComfyUI's own Flux class,
read by the pack as Flux.1 [dev] on its own (unshifted) sampling, trained by rectified flow;
its students take the product path (shared-base backend, DMD2Trainer, kohya export) and the
exported LoRA, put on it by ComfyUI's stock loader, samples in DMD2Generate's flow preset
exactly like the student."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sklearn")

from comfyui_dmd2 import bases
from comfyui_dmd2.training.digits import data as D
from comfyui_dmd2.training.digits import flow, students
from comfyui_dmd2.training.digits import teacher as T


@pytest.fixture(scope="module")
def data():
    return D.load_digits_data()


def test_the_flux_digits_teacher_is_comfyuis_flux_read_as_flux_dev_on_its_own_shift():
    import comfy.model_base
    import comfy.model_sampling
    from comfyui_dmd2.nodes.schedules import is_flow

    base = flow.build_base_model(seed=1)
    assert type(base) is comfy.model_base.Flux and isinstance(base.model_sampling, comfy.model_sampling.ModelSamplingFlux)
    family = bases.family_of(base)
    assert family == bases.FLUX_DEV and family.prediction == "flow" and family.network is bases.FLUX_NETWORK
    assert family.process.shift == 1.0  # its own ModelSamplingFlux (mu 0), not [dev]'s 1024-px 3.16
    assert flow.DIGITS_FLOW == family and flow.DIGITS_FLOW.process.shift == 1.0
    assert is_flow(flow.comfy_model(flow.new_teacher())) and flow.new_teacher().family.process.shift == 1.0
    # the trainer's grid unshifted: 999 is pure noise, 749 is t = 0.75
    assert family.process.time(torch.tensor([999, 749])).tolist() == [1.0, 0.75]
    # the class is read through both routes: the token and the pooled vector
    model = flow.new_teacher(seed=1)
    with torch.no_grad():
        for p in model.unet.final_layer.parameters():  # the zero-initialised output layer would hide every input
            p.normal_()
        x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), torch.tensor([3, 3])
        out = model.unet(x, family.process.model_time(t), D.one_hot(labels)[:, None], y=D.one_hot(labels))
        other_token = model.unet(x, family.process.model_time(t), D.one_hot(labels + 1)[:, None], y=D.one_hot(labels))
        other_vector = model.unet(x, family.process.model_time(t), D.one_hot(labels)[:, None], y=D.one_hot(labels + 1))
    assert (out - other_token).abs().max() > 1e-4 and (out - other_vector).abs().max() > 1e-4
    # the file round-trips and is told apart from the UNet's
    state = flow.denoiser_state_dict(model)
    assert flow.is_flow_file(state) and not flow.is_flow_file(T.denoiser_state_dict(T.new_teacher()))
    with pytest.raises(ValueError, match="not a Flux digits model"):
        flow.load_denoiser(T.denoiser_state_dict(T.new_teacher()))


def test_the_digits_loader_node_loads_either_kind_of_file(tmp_path):
    """The graph's loader (``DMD2DigitsModelLoader``) gives the Flux teacher's file as a Flux
    MODEL on its own sampling, and the UNet's file as before."""
    import importlib.util

    from comfyui_dmd2.nodes.schedules import is_flow
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("digits_node", D.__file__.replace("data.py", "node/__init__.py"))
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    model = flow.new_teacher(seed=4)
    save_file(flow.denoiser_state_dict(model), str(tmp_path / "flux.safetensors"))
    save_file(T.denoiser_state_dict(T.new_teacher()), str(tmp_path / "unet.safetensors"))
    (flux,) = node.DMD2DigitsModelLoader().load(str(tmp_path / "flux.safetensors"))
    (unet,) = node.DMD2DigitsModelLoader().load(str(tmp_path / "unet.safetensors"))
    assert is_flow(flux) and not is_flow(unet)
    for key, value in flux.model.diffusion_model.state_dict().items():
        assert torch.equal(value, model.unet.state_dict()[key]), key


def test_rectified_flow_training_and_the_euler_sampler(data):
    """The teacher learns v = eps - x0 (its loss falls), and the flow family's DDIM is flow
    Euler: x <- x + (t_next - t) v on t = 1, 0.75, 0.5, 0.25."""
    family = flow.DIGITS_FLOW
    x0, noise, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 249, 749, 999])
    x_t = family.add_noise(x0, noise, t)
    torch.testing.assert_close(T.training_target(family, x_t, x0, noise, t), noise - x0)
    torch.testing.assert_close(family.to_x0(x_t, noise - x0, t), x0)
    losses = []
    teacher = T.train_teacher(data, steps=80, batch_size=32, progress=lambda step, loss: losses.append(loss), model=flow.new_teacher())
    assert isinstance(teacher, flow.FlowDenoiser) and teacher.family.process.shift == 1.0
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20]), losses
    labels = D.balanced_labels(10)
    ddim = T.sample_ddim(teacher, labels, 4, seed=3)
    with torch.no_grad():
        x = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(3))
        times = [1.0, 0.75, 0.5, 0.25, 0.0]
        for k, step in enumerate((999, 749, 499, 249)):
            v = teacher.output(x, torch.full((10,), step), labels)
            x = x + (times[k + 1] - times[k]) * v
    torch.testing.assert_close(ddim, x, rtol=1e-4, atol=1e-4)
    assert ddim.shape == (10, 1, 8, 8)


def test_product_path_on_the_flux_teacher_and_its_lora_in_dmd2generate(data, tmp_path):
    """A few iterations of the 1-step student's layout (LoRA G on every Flux layer, a full fake
    score, the GAN on the last double block's tokens, a regression warm start): every loss is
    finite, the export is a kohya LoRA ComfyUI's stock loader applies key for key, and the flow
    1-step preset of DMD2Generate samples the averaged student."""
    import comfy.sd
    import comfy.utils
    from comfyui_dmd2.nodes.sampler import DMD2Generate

    teacher = flow.new_teacher(seed=2)
    settings = students.StudentSettings(timesteps=(999,), iterations=4, batch_size=8, fake_updates_per_generator_update=2,
                                        ema_decay=0.5, warmup_steps=0, regression_steps=2, regression_teacher_steps=2,
                                        lora_targets=("all",), full_copies=("fake_score",))
    history: list[dict] = []
    student = students.distill(teacher, data, settings, callbacks=[history.append])
    assert student.backend.family.name == "flux_dev" and student.backend.family.process.shift == 1.0
    assert "img_in" in student.backend.adapters.paths.values() and "double_blocks.1.img_attn.qkv" in student.backend.adapters.paths.values()
    assert student.backend.head is not None and student.backend.head.size == (4, 4)
    seen = {k for h in history for k in h if k.startswith("loss_")}
    assert {"loss_regression", "loss_dm", "loss_fake", "loss_gan_discriminator"} <= seen
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k.startswith("loss_"))
    path = student.export(tmp_path / "student.safetensors")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert all(k.startswith("lora_unet_") for k in lora) and "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in lora
    labels = D.balanced_labels(20)
    with student.trainer.averaged_generator():
        expected = T.sample_student(student.denoiser(), labels, (999,), seed=5)
    assert (expected - T.sample_student(teacher, labels, (999,), seed=5)).abs().max() > 1e-3  # the LoRA moved it
    model, _ = comfy.sd.load_lora_for_models(flow.comfy_model(teacher), None, lora, 1.0, 0.0)
    assert len(model.patches) == len(student.backend.adapters.layers)  # every key loaded
    out = DMD2Generate.execute(model=model, positive=T.comfy_conditioning(labels), latent_image={"samples": torch.zeros(20, 1, 8, 8)},
                               seed=5, preset=flow.flow_preset((999,)), custom_timesteps="")
    torch.testing.assert_close(out.result[0]["samples"].float(), expected, rtol=1e-2, atol=2e-3)  # fp16 LoRA file
