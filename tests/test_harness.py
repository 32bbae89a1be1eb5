"""The harness itself: tiny checkpoints load through ComfyUI's stock loaders, in-process and
in the real server, and a stock graph renders an image from them."""

import comfy.sd
import pytest
import torch

import tiny_models
from comfy_server import execution_error, output_images


@pytest.mark.parametrize("arch,model_class", [("sd15", "BaseModel"), ("sdxl", "SDXL")])
def test_tiny_checkpoint_loads_with_stock_loader(tiny_checkpoints, arch, model_class):
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoints[arch]))[:3]
    assert type(model.model).__name__ == model_class
    assert model.model.model_config.unet_config["context_dim"] == tiny_models.UNET_CONFIGS[arch]["context_dim"]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    assert cond.shape[-1] == tiny_models.UNET_CONFIGS[arch]["context_dim"]
    # the same weights as the in-process build with the same seed
    ref = tiny_models.unet_state_dict(tiny_models.build_model(arch, seed=0))
    loaded = model.model.diffusion_model.state_dict()
    assert set(ref) == set(loaded)
    assert all(torch.equal(ref[k], loaded[k].float()) for k in ref)
    assert vae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 64, 64, 3)


@pytest.mark.server
def test_stock_graph_runs_on_tiny_sdxl(comfy_server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sdxl.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                 "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                 "sampler_name": "lcm", "scheduler": "simple", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "harness"}},
    }
    entry = comfy_server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    images = output_images(comfy_server, entry)
    assert len(images) == 1 and images[0].stat().st_size > 0
