"""LoRA adapters on ComfyUI UNets: switching, and export that ComfyUI's stock loaders consume whole."""

from __future__ import annotations

import copy
import logging

import comfy.lora
import comfy.sd
import pytest
import tiny_models
import torch
from comfyui_dmd2.training import lora as lora_mod
from safetensors import safe_open
from safetensors.torch import load_file


def _inputs(arch: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = tiny_models.UNET_CONFIGS[arch]
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, 77, cfg["context_dim"], generator=gen)
    y = torch.randn(2, cfg["adm_in_channels"], generator=gen) if cfg["adm_in_channels"] else None
    return x, t, context, y


def _randomise_(adapters: lora_mod.UNetLoRA, name: str, seed: int) -> None:
    """Stand-in for training: non-zero up weights so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapters.named_parameters(name):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module", params=[("sd15", "dmd2"), ("sdxl", "dmd2"), ("sd15", "all"), ("sdxl", "all")], ids="-".join)
def trained(request, tmp_path_factory):
    arch, targets = request.param
    model = tiny_models.build_model(arch, seed=0)
    unet = copy.deepcopy(model.model.diffusion_model)
    adapters = lora_mod.UNetLoRA(unet, model.model.model_config.unet_config, rank=4, alpha=2.0, seed=1, targets=(targets,))
    _randomise_(adapters, "generator", 2)
    _randomise_(adapters, "fake_score", 3)
    path = adapters.export(tmp_path_factory.mktemp("lora") / f"{arch}_{targets}_lora.safetensors", metadata={"dmd2_steps": 7})
    return arch, model, unet, adapters, path


def test_targets_cover_attention_resnets_and_samplers(trained):
    _, model, unet, adapters, _ = trained
    suffixes = {p.rsplit(".", 1)[-1] for p in adapters.paths}
    for name in ("to_q", "to_k", "to_v", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "conv_shortcut"):
        assert name in suffixes
    assert any(p.endswith("to_out.0") for p in adapters.paths)
    assert any(p.endswith("ff.net.0.proj") for p in adapters.paths)
    assert any(p.endswith("downsamplers.0.conv") for p in adapters.paths)
    assert any(p.endswith("upsamplers.0.conv") for p in adapters.paths)
    # "all" adds the input/output convolutions and the embeddings (SDXL's ADM one too)
    embeddings = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    if adapters.targets[-1] == "add_embedding.linear_2":
        if model.model.model_config.unet_config.get("adm_in_channels"):
            embeddings |= {"add_embedding.linear_1", "add_embedding.linear_2"}
        assert embeddings <= set(adapters.paths)
    else:
        assert not embeddings & set(adapters.paths)
    # Every wrapped module really is a Linear/Conv2d of the UNet under its LDM path.
    for l_path in adapters.paths.values():
        assert isinstance(unet.get_submodule(l_path), lora_mod.LoRALayer)
    # The base weights are not duplicated: only adapter parameters were added.
    base = sum(p.numel() for p in model.model.diffusion_model.parameters())
    total = sum(p.numel() for p in unet.parameters())
    per_adapter = sum(p.numel() for p in adapters.parameters("generator"))
    assert total == base + 2 * per_adapter


def test_switch_selects_base_generator_or_fake(trained):
    arch, model, unet, adapters, _ = trained
    x, t, context, y = _inputs(arch)
    with torch.no_grad():
        reference = model.model.diffusion_model(x, t, context=context, y=y)
        with adapters.switch.use(None):
            base = unet(x, t, context=context, y=y)
        with adapters.switch.use("generator"):
            gen = unet(x, t, context=context, y=y)
        with adapters.switch.use("fake_score"):
            fake = unet(x, t, context=context, y=y)
    torch.testing.assert_close(base, reference, rtol=0, atol=1e-6)
    assert (gen - base).abs().max() > 1e-3
    assert (fake - gen).abs().max() > 1e-3
    assert adapters.switch.active is None


def test_merged_state_dict_is_the_plain_unet_with_the_adapter_folded_in(trained):
    arch, model, unet, adapters, _ = trained
    plain = copy.deepcopy(model.model.diffusion_model)
    merged = adapters.merged_state_dict("generator")
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    x, t, context, y = _inputs(arch, seed=4)
    with torch.no_grad(), adapters.switch.use("generator"):
        expected = unet(x, t, context=context, y=y)
    with torch.no_grad():
        got = plain(x, t, context=context, y=y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_merged_forward_gives_the_low_rank_outputs_and_gradients(arch):
    model = tiny_models.build_model(arch, seed=0)
    unet = copy.deepcopy(model.model.diffusion_model).requires_grad_(False)
    adapters = lora_mod.UNetLoRA(unet, model.model.model_config.unet_config, rank=3, alpha=6.0, seed=1)
    _randomise_(adapters, "generator", 2)
    x, t, context, y = _inputs(arch, seed=5)
    results = []
    for merged in (False, True):
        adapters.switch.merged = merged
        for p in adapters.parameters("generator"):
            p.grad = None
        with adapters.switch.use("generator"):
            out = unet(x, t, context=context, y=y)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in adapters.parameters("generator")]))
    (low, low_grads), (merged_out, merged_grads) = results
    torch.testing.assert_close(merged_out, low, rtol=1e-4, atol=1e-5)
    for a, b in zip(low_grads, merged_grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in merged_grads)


def test_fresh_adapter_is_identity_and_gradients_reach_only_the_active_one():
    model = tiny_models.build_model("sd15", seed=0)
    unet = copy.deepcopy(model.model.diffusion_model).requires_grad_(False)
    adapters = lora_mod.UNetLoRA(unet, model.model.model_config.unet_config, rank=2, alpha=1.0)
    x, t, context, _ = _inputs("sd15")
    with adapters.switch.use("generator"):
        out = unet(x, t, context=context)
    torch.testing.assert_close(out, model.model.diffusion_model(x, t, context=context), rtol=0, atol=1e-6)
    out.square().mean().backward()
    assert all(p.grad is not None for p in adapters.parameters("generator") if p is not None)
    assert all(p.grad is None for p in adapters.parameters("fake_score"))
    assert all(p.grad is None for p in model.model.diffusion_model.parameters())


def test_export_uses_kohya_keys_fp16_and_metadata(trained):
    *_, adapters, path = trained
    sd = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in sd)
    assert not any("lora_A" in k or "lora_B" in k or ".processor." in k for k in sd)
    assert len(sd) == 3 * len(adapters.paths)
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert any("_attn1_to_q.lora_down.weight" in k for k in sd)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["dmd2_steps"] == "7"
    assert meta["ss_network_dim"] == "4"


def test_stock_loader_consumes_every_key_and_reproduces_the_generator(trained, caplog, tmp_path):
    arch, model, unet, adapters, path = trained
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    assert prefixes <= set(key_map), sorted(prefixes - set(key_map))[:5]

    # ComfyUI's own LoraLoaderModelOnly node, from a loras folder.
    import folder_paths

    import nodes

    folder_paths.add_model_folder_path("loras", str(path.parent))
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(adapters.paths)

    x, t, context, y = _inputs(arch, seed=5)
    with torch.no_grad():
        with adapters.switch.use("generator"):
            ours = unet(x, t, context=context, y=y)
        patched.patch_model()
        try:
            stock = patched.model.diffusion_model(x, t, context=context, y=y)
        finally:
            patched.unpatch_model()
        base = model.model.diffusion_model(x, t, context=context, y=y)
    scale = ours.abs().max()
    assert (stock - ours).abs().max() / scale < 1e-3
    assert (ours - base).abs().max() / scale > 1e-2  # the LoRA does something the test can see


def test_load_state_dict_checks_keys_and_shapes(trained):
    _, _, _, adapters, _ = trained
    state = adapters.state_dict("generator")
    adapters.load_state_dict("fake_score", adapters.state_dict("fake_score"))
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(lora_mod.LoRAError, match="missing"):
        adapters.load_state_dict("generator", bad)
    key = next(iter(state))
    wrong = {**state, key: torch.zeros(1)}
    with pytest.raises(lora_mod.LoRAError, match="shape"):
        adapters.load_state_dict("generator", wrong)


def test_remove_restores_the_plain_unet():
    model = tiny_models.build_model("sd15", seed=0)
    unet = copy.deepcopy(model.model.diffusion_model)
    keys = set(unet.state_dict())
    adapters = lora_mod.UNetLoRA(unet, model.model.model_config.unet_config, rank=2)
    assert set(unet.state_dict()) != keys
    adapters.remove()
    assert set(unet.state_dict()) == keys


def test_fake_score_has_its_own_rank_at_the_same_scale(tmp_path):
    model = tiny_models.build_model("sd15", seed=0)
    unet = copy.deepcopy(model.model.diffusion_model)
    adapters = lora_mod.UNetLoRA(unet, model.model.model_config.unet_config, rank=2, alpha=1.0, ranks={"fake_score": 6})
    layer = next(iter(adapters.layers.values()))
    g, f = layer.adapters["generator"], layer.adapters["fake_score"]
    assert (g.rank, f.rank) == (2, 6)
    assert g.scale == f.scale == 0.5
    assert sum(p.numel() for p in adapters.parameters("fake_score")) == 3 * sum(p.numel() for p in adapters.parameters("generator"))
    # the export is the generator's, at its own rank and alpha
    path = adapters.export(tmp_path / "g.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")
        down = next(k for k in fh.keys() if k.endswith("lora_down.weight"))
        assert fh.get_tensor(down).shape[0] == 2
    with pytest.raises(lora_mod.LoRAError, match="rank must be >= 1, got 0 for 'fake_score'"):
        lora_mod.UNetLoRA(copy.deepcopy(model.model.diffusion_model), model.model.model_config.unet_config, rank=2, ranks={"fake_score": 0})
