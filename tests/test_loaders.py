"""DMD2 loaders in-process: release registry, reading without unpickling, architecture and
key/shape checks (tiny files and the real SDXL/SD1.5 key sets on the meta device), the
LoRA's every-key-applied guarantee, .bin -> .safetensors, and fetching from a hub imitation
on loopback (progress, resume, rename) or failing clearly offline."""

from __future__ import annotations

import contextlib

import hashlib
import http.server
import re
import threading
import types

import comfy.controlnet
import comfy.supported_models
import comfy.utils
import folder_paths
import huggingface_hub.constants
import pytest
import safetensors.torch
import tiny_models
import tiny_releases
import torch
from comfyui_dmd2.nodes import loaders
from comfyui_dmd2.nodes import adapter
from comfyui_dmd2.nodes.releases import FOLDERS, RELEASES, RELEASES_BY_NAME, releases
from comfyui_dmd2.nodes.schedules import PRESETS, parse_timesteps


def ldm_weights(model) -> dict[str, torch.Tensor]:
    return model.model.diffusion_model.state_dict()


def expect_file_weights(model, arch: str, file_sd: dict):
    mapping = loaders.diffusers_to_ldm_map(tiny_models.UNET_CONFIGS[arch] | {"num_heads": -1})
    weights = ldm_weights(model)
    assert len(file_sd) == len(weights)
    for key, value in file_sd.items():
        assert torch.equal(weights[mapping[key]].cpu(), value.to(weights[mapping[key]].dtype)), key


@pytest.fixture
def model_folders(tmp_path, monkeypatch):
    """ComfyUI's diffusion_models, loras, controlnet and checkpoints folders pointed at empty temporary folders."""
    folders = {}
    for name in ("diffusion_models", "loras", "controlnet", "checkpoints"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(folder)], set(folder_paths.supported_pt_extensions)))
        folders[name] = folder
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folders


# -- registry -------------------------------------------------------------------------------
def test_registry_lists_the_releases_with_usable_presets():
    names = [r.file_name for r in RELEASES]
    assert len(names) == len(set(names))
    assert {"dmd2_sdxl_4step_unet_fp16.bin", "dmd2_sdxl_1step_unet_fp16.bin",
            "dmd2_sdxl_4step_lora_fp16.safetensors"} <= set(names)
    assert {r.arch for r in releases("unet")} == {"sdxl", "sd15"}
    for r in RELEASES:
        assert r.folder == FOLDERS[r.kind]
        assert r.url == f"https://huggingface.co/{r.repo_id}/resolve/main/{r.repo_path}"
        if r.kind == "t2i_adapter":
            continue
        family_repos = {"dmd2": {"tianweiy/DMD2"}, "lightning": {"ByteDance/SDXL-Lightning"},
                        "hyper": {"ByteDance/Hyper-SD"},
                        "lcm": {"latent-consistency/lcm-lora-sdxl", "latent-consistency/lcm-lora-sdv1-5"},
                        "tcd": {"h1t/TCD-SDXL-LoRA", "h1t/TCD-SD15-LoRA"}, "turbo": {"stabilityai/sdxl-turbo"}}
        assert r.repo_id in family_repos[r.family], r
        assert r.folder in ("diffusion_models", "loras", "checkpoints")
        assert r.preset in PRESETS
        if r.family != "dmd2":  # every other family's file has its family's published recipe
            assert r.recipe is not None and r.recipe.family == r.family and r.preset != "custom", r
        if r.preset == "custom":  # the SD1.5 generator: one step at 999
            assert parse_timesteps(",".join(map(str, r.timesteps))) == list(r.timesteps)
        else:
            assert PRESETS[r.preset] == r.timesteps
    assert RELEASES_BY_NAME["dmd2_sdxl_1step_unet_fp16.bin"].preset == "1-step (399)"
    # the canny recipe's adapter, under the name the shipped workflow uses
    canny = RELEASES_BY_NAME["t2i-adapter-canny-sdxl-1.0.safetensors"]
    assert releases("t2i_adapter") == [canny] and canny.folder == "controlnet" and canny.arch == "sdxl"
    assert canny.url == ("https://huggingface.co/TencentARC/t2i-adapter-canny-sdxl-1.0/resolve/main/"
                         "diffusion_pytorch_model.fp16.safetensors")


# -- UNet: good files -----------------------------------------------------------------------
@pytest.mark.parametrize("name", [r.file_name for r in releases("unet")])
def test_each_unet_release_loads_onto_its_base(tmp_path, name):
    release = RELEASES_BY_NAME[name]
    path = tiny_releases.write_release(release, tmp_path)
    file_sd = loaders.read_state_dict(path)
    assert {v.dtype for v in file_sd.values()} == {torch.float16 if release.dtype == "fp16" else torch.float32}
    base = tiny_models.build_model(release.arch, seed=3)
    before = {k: v.clone() for k, v in ldm_weights(base).items()}
    model = loaders.load_dmd2_unet(base, path)
    assert type(model.model) is type(base.model) and model.model is not base.model
    expect_file_weights(model, release.arch, file_sd)
    assert all(torch.equal(before[k], v) for k, v in ldm_weights(base).items()), "the base model was modified"
    # it runs: one UNet evaluation differs from the base's on the same input
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 3, tiny_models.UNET_CONFIGS[release.arch]["context_dim"])
    extra = {"y": torch.randn(1, tiny_models.UNET_CONFIGS["sdxl"]["adm_in_channels"])} if release.arch == "sdxl" else {}
    sigma = torch.tensor([10.0])
    out = model.model.apply_model(x, sigma, c_crossattn=ctx, **extra)
    ref = base.model.apply_model(x, sigma, c_crossattn=ctx, **extra)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)


def test_fp16_file_onto_fp16_model(tmp_path):
    config = tiny_models.TinySDXL(dict(tiny_models.UNET_CONFIGS["sdxl"]))
    config.set_inference_dtype(torch.float16, None)
    base_model = config.get_model({})
    tiny_models.init_weights_(base_model.diffusion_model, 0)
    import comfy.model_patcher
    base = comfy.model_patcher.ModelPatcher(base_model, torch.device("cpu"), torch.device("cpu"))
    file_sd = tiny_releases.write_unet_release(tmp_path / "x.bin", "sdxl", torch.float16)
    model = loaders.load_dmd2_unet(base, tmp_path / "x.bin")
    assert {v.dtype for v in ldm_weights(model).values()} == {torch.float16}
    expect_file_weights(model, "sdxl", file_sd)
    # same dtype: the model's weights are the file's tensors, not a second copy
    ldm = loaders.to_comfy_unet_state_dict(loaders.read_state_dict(tmp_path / "x.bin"), loaders.TargetUNet.from_model(base))
    pointers = {k: v.data_ptr() for k, v in ldm.items()}
    shared = loaders.build_model_like(base, ldm)
    assert ldm == {}
    assert {k: v.data_ptr() for k, v in ldm_weights(shared).items()} == pointers
    assert not any(t.is_meta for t in list(shared.model.parameters()) + list(shared.model.buffers()))


def test_ldm_keyed_and_safetensors_files_load(tmp_path):
    file_sd = tiny_releases.write_unet_release(tmp_path / "d.safetensors", "sdxl", torch.float16)
    model = loaders.load_dmd2_unet(tiny_models.build_model("sdxl"), tmp_path / "d.safetensors")
    expect_file_weights(model, "sdxl", file_sd)
    # a ComfyUI-keyed copy (as UNETLoader-style files or checkpoints carry) gives the same weights
    ldm = {"model.diffusion_model." + k: v for k, v in ldm_weights(model).items()}
    safetensors.torch.save_file(ldm, str(tmp_path / "ldm.safetensors"))
    again = loaders.load_dmd2_unet(tiny_models.build_model("sdxl", seed=5), tmp_path / "ldm.safetensors")
    expect_file_weights(again, "sdxl", file_sd)


def test_convert_to_safetensors_writes_a_pickle_free_twin_once(tmp_path):
    file_sd = tiny_releases.write_unet_release(tmp_path / "dmd2.bin", "sd15", torch.float32)
    loaders.load_dmd2_unet(tiny_models.build_model("sd15"), tmp_path / "dmd2.bin", convert_to_safetensors=True)
    twin = tmp_path / "dmd2.safetensors"
    converted = safetensors.torch.load_file(str(twin))
    assert converted.keys() == file_sd.keys() and all(torch.equal(converted[k], file_sd[k]) for k in file_sd)
    stamp = twin.stat().st_mtime_ns
    assert loaders.convert_bin_to_safetensors(tmp_path / "dmd2.bin") == twin and twin.stat().st_mtime_ns == stamp
    expect_file_weights(loaders.load_dmd2_unet(tiny_models.build_model("sd15"), twin), "sd15", file_sd)
    # off by default: nothing written
    tiny_releases.write_unet_release(tmp_path / "other.bin", "sd15", torch.float32)
    loaders.load_dmd2_unet(tiny_models.build_model("sd15"), tmp_path / "other.bin")
    assert not (tmp_path / "other.safetensors").exists()


def test_tiny_diffusers_names_are_comfyuis_mapping():
    """The synthesized files use diffusers' own names, which are exactly ComfyUI's map of the tiny UNet."""
    for arch in ("sd15", "sdxl"):
        names = set(tiny_releases.diffusers_unet(arch).state_dict())
        mapped = tiny_models.diffusers_unet_state_dict(arch, tiny_models.unet_state_dict(tiny_models.build_model(arch)))
        assert names == set(mapped)


# -- UNet: real key sets (meta device) ------------------------------------------------------
@pytest.fixture(scope="module")
def real_sets():
    out = {}
    for arch in ("sdxl", "sd15"):
        diff = tiny_releases.diffusers_unet(arch, real=True)
        comfy_model = tiny_releases.real_comfy_model(arch)
        out[arch] = (diff.state_dict(), loaders.TargetUNet.from_unet(comfy_model.model_config.unet_config,
                                                                     comfy_model.diffusion_model), diff, comfy_model)
    return out


def test_real_release_key_sets_match_real_targets_only(real_sets):
    for arch, other in (("sdxl", "sd15"), ("sd15", "sdxl")):
        file_sd, target, _, _ = real_sets[arch]
        traits = loaders.unet_traits(file_sd)
        assert traits.family == arch and traits.context_dim == {"sdxl": 2048, "sd15": 768}[arch]
        converted = loaders.to_comfy_unet_state_dict(file_sd, target, name="real.bin")
        assert set(converted) == set(target.shapes)
        with pytest.raises(loaders.DMD2LoadError) as err:
            loaders.to_comfy_unet_state_dict(file_sd, real_sets[other][1], name="real.bin")
        names = {"sdxl": "SDXL", "sd15": "SD1.5"}
        message = str(err.value)
        assert f"is an {names[arch]} UNet" in message and f"connected model is {names[other]}" in message


def test_real_lora_key_set_is_fully_applied_on_real_sdxl_only(real_sets):
    diff_sdxl, comfy_sdxl = real_sets["sdxl"][2], real_sets["sdxl"][3]
    lora = tiny_releases.lora_state_dict(diff_sdxl, rank=64, meta=True)
    n_modules = len(list(tiny_releases.lora_modules(diff_sdxl)))
    assert len(lora) == 3 * n_modules
    patches = loaders.lora_patches(types.SimpleNamespace(model=comfy_sdxl), lora, name="dmd2_lora")
    assert len(patches) == n_modules
    with pytest.raises(loaders.DMD2LoadError, match=r"made for SDXL \(cross-attention dim 2048\).*SD1.5"):
        loaders.lora_patches(types.SimpleNamespace(model=real_sets["sd15"][3]), lora, name="dmd2_lora")


# -- UNet: bad input --------------------------------------------------------------------------
def test_sd15_unet_offered_to_sdxl_base_is_refused(tmp_path):
    tiny_releases.write_unet_release(tmp_path / "sd15.bin", "sd15", torch.float32)
    with pytest.raises(loaders.DMD2LoadError, match=r"sd15.bin is an SD1.5 UNet .*connected model is SDXL"):
        loaders.load_dmd2_unet(tiny_models.build_model("sdxl"), tmp_path / "sd15.bin")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file_is_refused(tmp_path, suffix):
    tiny_releases.write_unet_release(tmp_path / ("full" + suffix), "sdxl")
    cut = tiny_releases.write_truncated(tmp_path / ("full" + suffix), tmp_path / ("cut" + suffix))
    with pytest.raises(loaders.DMD2LoadError, match=r"cut.* (truncated|not a readable).*download it again"):
        loaders.load_dmd2_unet(tiny_models.build_model("sdxl"), cut)


def test_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    bomb = tiny_releases.write_pickle_bomb(tmp_path / "evil.bin", marker)
    with pytest.raises(loaders.DMD2LoadError, match=r"Refused to load evil.bin.*Nothing from it was executed"):
        loaders.load_dmd2_unet(tiny_models.build_model("sdxl"), bomb)
    assert not marker.exists()
    # the payload is real: plain pickle loading runs it (proves the test would catch a loader that unpickles)
    torch.load(bomb, weights_only=False)
    assert marker.exists()


def test_missing_extra_and_misshapen_keys_are_refused(tmp_path):
    sd = tiny_releases.unet_release_state_dict("sdxl", torch.float16)
    target = loaders.TargetUNet.from_model(tiny_models.build_model("sdxl"))
    dropped = dict(sd)
    dropped.pop("mid_block.resnets.0.conv1.weight")
    with pytest.raises(loaders.DMD2LoadError, match=r"1 missing \(e.g. \['middle_block.0.in_layers.2.weight'\]\)"):
        loaders.to_comfy_unet_state_dict(dropped, target)
    extra = dict(sd, **{"some_adapter.weight": torch.zeros(1)})
    with pytest.raises(loaders.DMD2LoadError, match=r"1 unexpected \(e.g. \['some_adapter.weight'\]\)"):
        loaders.to_comfy_unet_state_dict(extra, target)
    misshapen = dict(sd, **{"conv_out.weight": torch.zeros(4, 32, 1, 1, dtype=torch.float16)})
    with pytest.raises(loaders.DMD2LoadError, match=r"conv_out|out.2.weight: \(4, 32, 1, 1\) in the file, \(4, 32, 3, 3\)"):
        loaders.to_comfy_unet_state_dict(misshapen, target)
    with pytest.raises(loaders.DMD2LoadError, match="not a Stable Diffusion UNet"):
        loaders.to_comfy_unet_state_dict({"text_model.weight": torch.zeros(2)}, target)


def test_non_tensor_content_is_refused(tmp_path):
    torch.save({"conv_in.weight": torch.zeros(1), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(loaders.DMD2LoadError, match="not a plain state dict"):
        loaders.read_state_dict(tmp_path / "mixed.bin")


# -- LoRA -----------------------------------------------------------------------------------
def test_lora_release_applies_every_key(tmp_path):
    release = RELEASES_BY_NAME["dmd2_sdxl_4step_lora_fp16.safetensors"]
    path = tiny_releases.write_release(release, tmp_path)
    lora_sd = safetensors.torch.load_file(str(path))
    assert {v.dtype for v in lora_sd.values()} == {torch.float16}
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in lora_sd)
    base = tiny_models.build_model("sdxl")
    model = loaders.load_dmd2_lora(base, path, 0.5)
    assert len(model.patches) == len(lora_sd) // 3 and not base.patches
    assert {p[0] for ps in model.patches.values() for p in ps} == {0.5}
    # applying changes the adapted weights, by strength * up @ down * alpha / rank
    key = "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_q.weight"
    prefix = "lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_q"
    up, down = lora_sd[prefix + ".lora_up.weight"].float(), lora_sd[prefix + ".lora_down.weight"].float()
    before = base.model.state_dict()[key].clone()
    model.patch_model()
    try:
        delta = model.model.state_dict()[key] - before
    finally:
        model.unpatch_model()
    torch.testing.assert_close(delta, 0.5 * (up @ down) * 8.0 / up.shape[1], atol=1e-4, rtol=1e-3)


def test_lora_with_unloadable_keys_is_refused(tmp_path):
    lora_sd = tiny_releases.lora_state_dict(tiny_releases.diffusers_unet("sdxl"))
    safetensors.torch.save_file(dict(lora_sd, **{"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 2)}),
                                str(tmp_path / "extra.safetensors"))
    with pytest.raises(loaders.DMD2LoadError, match=r"1 of its \d+ keys match no weight.*lora_unet_not_a_layer"):
        loaders.load_dmd2_lora(tiny_models.build_model("sdxl"), tmp_path / "extra.safetensors", 1.0)
    te = dict(lora_sd, **{"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)})
    safetensors.torch.save_file(te, str(tmp_path / "te.safetensors"))
    with pytest.raises(loaders.DMD2LoadError, match="text-encoder weights.*LoraLoader"):
        loaders.load_dmd2_lora(tiny_models.build_model("sdxl"), tmp_path / "te.safetensors", 1.0)
    # PEFT-style names: ComfyUI would drop them silently
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight": torch.zeros(4, 64)}
    safetensors.torch.save_file(peft, str(tmp_path / "peft.safetensors"))
    with pytest.raises(loaders.DMD2LoadError, match="1 of its 1 keys match no weight"):
        loaders.load_dmd2_lora(tiny_models.build_model("sdxl"), tmp_path / "peft.safetensors", 1.0)


def test_lora_with_wrong_shapes_is_refused(tmp_path):
    lora_sd = tiny_releases.lora_state_dict(tiny_releases.diffusers_unet("sdxl"))
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    lora_sd[key] = torch.zeros(4, 48, dtype=torch.float16)  # the layer takes 64 features
    safetensors.torch.save_file(lora_sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(loaders.DMD2LoadError, match=r"down \(4, 48\), which does not fit the weight's shape \(64, 64\)"):
        loaders.load_dmd2_lora(tiny_models.build_model("sdxl"), tmp_path / "shape.safetensors", 1.0)


def test_sdxl_lora_on_sd15_model_is_refused(tmp_path):
    path = tiny_releases.write_release(RELEASES_BY_NAME["dmd2_sdxl_4step_lora_fp16.safetensors"], tmp_path)
    with pytest.raises(loaders.DMD2LoadError, match="match no weight"):
        loaders.load_dmd2_lora(tiny_models.build_model("sd15"), path, 1.0)


# -- finding and fetching -------------------------------------------------------------------
def test_combo_lists_releases_then_local_files(model_folders):
    (model_folders["diffusion_models"] / "my_dmd2.safetensors").write_bytes(b"x")
    (model_folders["diffusion_models"] / "dmd2_sdxl_4step_unet_fp16.bin").write_bytes(b"x")
    options = loaders.file_options("diffusion_models", "unet")
    assert options == [r.file_name for r in releases("unet")] + ["my_dmd2.safetensors"]
    for node in loaders.NODE_CLASSES:
        schema = node.define_schema()
        assert schema.category == "DMD2/loaders" and all(i.tooltip for i in schema.inputs)


def test_missing_release_offline_names_file_and_folder(model_folders, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = model_folders["diffusion_models"]
    with pytest.raises(loaders.DMD2LoadError) as err:
        loaders.resolve_file("diffusion_models", "dmd2_sdxl_4step_unet_fp16.bin", "unet")
    message = str(err.value)
    assert "offline" in message and str(folder / "dmd2_sdxl_4step_unet_fp16.bin") in message
    assert "https://huggingface.co/tianweiy/DMD2/resolve/main/dmd2_sdxl_4step_unet_fp16.bin" in message
    assert list(folder.iterdir()) == []
    with pytest.raises(loaders.DMD2LoadError, match="not_a_release.bin was not found"):
        loaders.resolve_file("diffusion_models", "not_a_release.bin", "unet")


@pytest.mark.parametrize("name", list(RELEASES_BY_NAME))
def test_every_missing_file_hint_has_a_direct_download_url(model_folders, monkeypatch, name):
    """The hint a user follows by hand: a /resolve/ URL (the file itself), never /blob/ (a web page)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    release = RELEASES_BY_NAME[name]
    with pytest.raises(loaders.DMD2LoadError) as err:
        loaders.resolve_file(release.folder, name, release.kind)
    message = str(err.value)
    assert re.search(r"https://huggingface\.co/\S+/resolve/main/\S+", message) and "/blob/" not in message
    assert release.url in message and str(model_folders[release.folder] / name) in message


class FakeHub(http.server.ThreadingHTTPServer):
    """The two hub calls hf_hub_download makes (HEAD for metadata, GET with Range), on 127.0.0.1.
    The first ``cuts_left`` GET responses are cut short to exercise resuming."""

    def __init__(self, files: dict[str, bytes], repo_id: str = "tianweiy/DMD2"):
        self.files = files
        self.repo_id = repo_id
        self.requests: list[tuple[str, str, str | None]] = []
        self.cuts_left = 1  # GET responses still to cut short
        self.etag: str | None = None  # None: the sha256 of the file, as the hub sends for LFS files
        super().__init__(("127.0.0.1", 0), FakeHubHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _lookup(self):
        prefix = f"/{self.server.repo_id}/resolve/main/"
        path = self.path.split("?")[0]
        return self.server.files.get(path[len(prefix):]) if path.startswith(prefix) else None

    def _headers(self, data: bytes, status=200, extra=None):
        self.send_response(status)
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("ETag", '"%s"' % (self.server.etag or hashlib.sha256(data).hexdigest()))  # LFS: sha256
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, None))
        data = self._lookup()
        if data is None:
            self._headers(b"", 404, {"Content-Length": "0"})
            return
        self._headers(data, extra={"Content-Length": str(len(data))})

    def do_GET(self):
        rng = self.headers.get("Range")
        self.server.requests.append(("GET", self.path, rng))
        data = self._lookup()
        if data is None:
            self._headers(b"", 404, {"Content-Length": "0"})
            return
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        body = data[start:]
        status = 206 if rng else 200
        extra = {"Content-Length": str(len(body))}
        if rng:
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._headers(data, status, extra)
        if self.server.cuts_left > 0:
            self.server.cuts_left -= 1
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serving(release, folder, **hub_options):
    """A FakeHub serving a tiny file of ``release`` (written into ``folder``) in a thread."""
    source = tiny_releases.write_release(release, folder)
    hub = FakeHub({release.repo_path: source.read_bytes()}, repo_id=release.repo_id)
    for key, value in hub_options.items():
        setattr(hub, key, value)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, source
    finally:
        hub.shutdown()
        hub.server_close()


@pytest.fixture
def fake_hub(tmp_path):
    release = RELEASES_BY_NAME["dmd2_sd15_1step_unet_fid8.35.bin"]  # lives in a sub folder of the repo
    with serving(release, tmp_path / "hub") as (hub, source):
        yield hub, release, source


def test_missing_release_is_fetched_resumed_and_renamed(model_folders, fake_hub, monkeypatch):
    hub, release, source = fake_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # resume at chunk granularity
    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: progress.append((value, total)))
    folder = model_folders["diffusion_models"]
    path = None
    for _ in range(2):  # huggingface_hub resumes within the call or on the next one
        try:
            path = loaders.resolve_file("diffusion_models", release.file_name, "unet", endpoint=hub.endpoint)
            break
        except loaders.DMD2LoadError as e:
            assert release.file_name in str(e) and "download failed" in str(e)
    assert path == folder / release.file_name
    assert path.read_bytes() == source.read_bytes()
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert gets[0][2] is None and gets[-1][2] is not None and gets[-1][2].startswith("bytes="), [r[0::2] for r in hub.requests]
    assert all(r[1] == "/tianweiy/DMD2/resolve/main/" + release.repo_path for r in hub.requests)
    assert progress and progress[-1] == (len(source.read_bytes()),) * 2
    # the fetched file is a working SD1.5 DMD2 UNet, and the next resolve uses it without the hub
    model = loaders.load_dmd2_unet(tiny_models.build_model("sd15"), path)
    expect_file_weights(model, "sd15", loaders.read_state_dict(source))
    hub.requests.clear()
    assert loaders.resolve_file("diffusion_models", release.file_name, "unet", endpoint=hub.endpoint) == path
    assert hub.requests == []


def test_unreachable_hub_names_file_and_folder(model_folders, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    import huggingface_hub.utils._http as hf_http
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # skip the retry back-off (about 30 s)
    with pytest.raises(loaders.DMD2LoadError) as err:
        loaders.resolve_file("loras", "dmd2_sdxl_4step_lora_fp16.safetensors", "lora", endpoint="http://127.0.0.1:9")
    message = str(err.value)
    assert "download failed" in message and str(model_folders["loras"] / "dmd2_sdxl_4step_lora_fp16.safetensors") in message


def test_names_outside_the_folders_are_refused(model_folders):
    assert loaders.check_choice("diffusion_models", "unet", "dmd2_sdxl_4step_unet_fp16.bin") is True
    assert "neither" in loaders.check_choice("diffusion_models", "unet", "../checkpoints/x.safetensors")
    with pytest.raises(loaders.DMD2LoadError, match="only files inside"):
        loaders.resolve_file("diffusion_models", "../checkpoints/x.safetensors", "unet")
    with pytest.raises(loaders.DMD2LoadError, match="only files inside"):
        loaders.resolve_file("loras", "/etc/passwd", "lora")


def test_nodes_load_releases_from_the_model_folders(model_folders):
    """The node classes over the functions: combo value -> file in the folder -> MODEL."""
    unet_release = RELEASES_BY_NAME["dmd2_sdxl_1step_unet_fp16.bin"]
    file_sd = loaders.read_state_dict(tiny_releases.write_release(unet_release, model_folders["diffusion_models"]))
    tiny_releases.write_release(RELEASES_BY_NAME["dmd2_sdxl_4step_lora_fp16.safetensors"], model_folders["loras"])
    base = tiny_models.build_model("sdxl")
    assert loaders.DMD2UNetLoader.validate_inputs(unet_release.file_name) is True
    assert "neither" in loaders.DMD2UNetLoader.validate_inputs("nope.bin")
    unet_model = loaders.DMD2UNetLoader.execute(base, unet_release.file_name, True).result[0]
    expect_file_weights(unet_model, "sdxl", file_sd)
    assert (model_folders["diffusion_models"] / "dmd2_sdxl_1step_unet_fp16.safetensors").is_file()
    assert loaders.DMD2LoraLoader.validate_inputs("dmd2_sdxl_4step_lora_fp16.safetensors") is True
    lora_model = loaders.DMD2LoraLoader.execute(base, "dmd2_sdxl_4step_lora_fp16.safetensors", 0.7).result[0]
    assert lora_model.patches and not base.patches


def test_interrupted_download_resumes_on_the_next_run(model_folders, fake_hub, monkeypatch):
    """A run whose download keeps failing leaves its partial file; the next run continues it."""
    hub, release, source = fake_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    import huggingface_hub.file_download as hf_download
    monkeypatch.setattr(hf_download.time, "sleep", lambda seconds: None)  # hf waits 1 s between its retries
    hub.cuts_left = 1000  # every GET of the first run is cut
    with pytest.raises(loaders.DMD2LoadError, match="download failed"):
        loaders.resolve_file("diffusion_models", release.file_name, "unet", endpoint=hub.endpoint)
    assert not (model_folders["diffusion_models"] / release.file_name).exists()
    parts = list((model_folders["diffusion_models"] / ".dmd2-download").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(source.read_bytes())
    hub.cuts_left = 0
    hub.requests.clear()
    path = loaders.resolve_file("diffusion_models", release.file_name, "unet", endpoint=hub.endpoint)
    assert not parts[0].exists()
    assert path.read_bytes() == source.read_bytes()
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert len(gets) == 1 and gets[0][2] is not None and int(gets[0][2][len("bytes="):].rstrip("-")) > 0


def test_download_with_wrong_checksum_is_discarded(model_folders, fake_hub, monkeypatch):
    hub, release, _ = fake_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.cuts_left = 0
    hub.etag = "0" * 64  # the hub announces another file's sha256
    with pytest.raises(loaders.DMD2LoadError, match="sha256 mismatch"):
        loaders.resolve_file("diffusion_models", release.file_name, "unet", endpoint=hub.endpoint)
    assert not (model_folders["diffusion_models"] / release.file_name).exists()
    assert list((model_folders["diffusion_models"] / ".dmd2-download").glob("*.part")) == []


# -- the canny T2I-Adapter through the same path ------------------------------------------------
ADAPTER = RELEASES_BY_NAME["t2i-adapter-canny-sdxl-1.0.safetensors"]


def test_adapter_loader_offers_the_canny_adapter_when_missing(model_folders):
    (model_folders["controlnet"] / "my_adapter.safetensors").write_bytes(b"x")
    assert loaders.file_options("controlnet", "t2i_adapter") == [ADAPTER.file_name, "my_adapter.safetensors"]
    options = adapter.DMD2T2IAdapterLoader.define_schema().inputs[0].options
    assert options == [ADAPTER.file_name, "my_adapter.safetensors"]
    assert adapter.DMD2T2IAdapterLoader.validate_inputs(ADAPTER.file_name) is True
    assert "neither a known T2I-Adapter release" in adapter.DMD2T2IAdapterLoader.validate_inputs("nope.safetensors")
    assert "neither" in adapter.DMD2T2IAdapterLoader.validate_inputs("../checkpoints/x.safetensors")


def test_missing_adapter_offline_names_file_folder_and_url(model_folders, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = model_folders["controlnet"]
    with pytest.raises(loaders.DMD2LoadError) as err:
        adapter.DMD2T2IAdapterLoader.execute(ADAPTER.file_name)
    message = str(err.value)
    assert "offline" in message and str(folder / ADAPTER.file_name) in message
    assert ("https://huggingface.co/TencentARC/t2i-adapter-canny-sdxl-1.0/resolve/main/"
            "diffusion_pytorch_model.fp16.safetensors") in message
    assert "158 MB" in message and list(folder.iterdir()) == []


@pytest.fixture
def adapter_hub(tmp_path):
    import tiny_adapters

    with serving(ADAPTER, tmp_path / "hub", cuts_left=0) as (hub, source):  # a tiny fp16 SDXL adapter, seed 0
        yield hub, source, tiny_adapters


def test_missing_adapter_is_fetched_into_controlnet_and_loads(model_folders, adapter_hub, monkeypatch):
    """Same download path as the DMD2 files (progress bar, size and sha256 check), then the node
    loads the fetched file as a CONTROL_NET."""
    hub, source, tiny_adapters = adapter_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # what HF_ENDPOINT does at import: the node itself passes no endpoint
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: progress.append((value, total)))
    control = adapter.DMD2T2IAdapterLoader.execute(ADAPTER.file_name).result[0]
    path = model_folders["controlnet"] / ADAPTER.file_name
    assert path.read_bytes() == source.read_bytes()
    assert {r[1] for r in hub.requests} == {f"/{ADAPTER.repo_id}/resolve/main/{ADAPTER.repo_path}"}
    assert progress and progress[-1] == (len(source.read_bytes()),) * 2
    assert isinstance(control, comfy.controlnet.T2IAdapter)
    expected = adapter.diffusers_to_tencent_keys(tiny_adapters.build_adapter("sdxl").state_dict())
    weights = control.t2i_model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], v.half().float()) for k, v in expected.items())
    hub.requests.clear()
    adapter.DMD2T2IAdapterLoader.execute(ADAPTER.file_name)  # on disk now: no hub call
    assert hub.requests == []


def test_adapter_download_with_wrong_checksum_is_discarded(model_folders, adapter_hub, monkeypatch):
    hub, _, _ = adapter_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.etag = "0" * 64
    with pytest.raises(loaders.DMD2LoadError, match="sha256 mismatch"):
        loaders.resolve_file("controlnet", ADAPTER.file_name, "t2i_adapter", endpoint=hub.endpoint)
    assert not (model_folders["controlnet"] / ADAPTER.file_name).exists()
