"""The DMD2 sampling nodes in a real ComfyUI server: graphs run, bad timesteps give clear
errors, and the server keeps serving afterwards."""

import pytest

from comfy_server import PromptRejected, execution_error, output_images

pytestmark = pytest.mark.server


def generate_graph(preset="4-step (999,749,499,249)", custom="999,749,499,249", seed=1, prefix="dmd2_generate"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sdxl.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DMD2Generate", "inputs": {"model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0],
                                                     "seed": seed, "preset": preset, "custom_timesteps": custom}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def sampler_custom_graph(preset="1-step (399)", custom="", seed=2, prefix="dmd2_custom"):
    graph = generate_graph(prefix=prefix)
    graph["7"] = {"class_type": "DMD2Schedule", "inputs": {"model": ["1", 0], "preset": preset, "custom_timesteps": custom}}
    graph["8"] = {"class_type": "DMD2Sampler", "inputs": {}}
    graph["4"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": ["2", 0],
        "negative": ["2", 0], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["3", 0]}}
    return graph


def assert_one_image(server, entry):
    assert execution_error(entry) is None, execution_error(entry)
    images = output_images(server, entry)
    assert len(images) == 1 and images[0].stat().st_size > 0
    return images[0]


def test_nodes_are_registered_with_their_schemas(comfy_server):
    info = comfy_server.object_info()
    gen = info["DMD2Generate"]
    assert gen["category"] == "DMD2/sampling" and gen["output"] == ["LATENT"]
    assert list(gen["input"]["required"]) == ["model", "positive", "latent_image", "seed", "preset", "custom_timesteps"]
    from comfyui_dmd2.nodes.schedules import PRESET_NAMES

    options = gen["input"]["required"]["preset"][1]["options"]
    assert options == PRESET_NAMES and options[:2] == ["4-step (999,749,499,249)", "1-step (399)"]
    assert options[-1] == "custom" and "SDXL-Lightning 4-step (euler, trailing)" in options
    assert all(spec[1].get("tooltip") for spec in gen["input"]["required"].values())
    assert info["DMD2Schedule"]["output"] == ["SIGMAS"]
    assert info["DMD2Sampler"]["output"] == ["SAMPLER"]


def test_generate_graph_renders(comfy_server):
    entry = comfy_server.run(generate_graph())
    assert_one_image(comfy_server, entry)


def test_sampler_custom_with_dmd2_schedule_renders(comfy_server):
    entry = comfy_server.run(sampler_custom_graph())
    assert_one_image(comfy_server, entry)


def test_generate_and_sampler_custom_render_the_same_image(comfy_server):
    import numpy as np
    from PIL import Image

    generated = assert_one_image(comfy_server, comfy_server.run(generate_graph(seed=11, prefix="dmd2_same_a")))
    custom = assert_one_image(comfy_server, comfy_server.run(
        sampler_custom_graph(preset="4-step (999,749,499,249)", seed=11, prefix="dmd2_same_b")))
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (generated, custom))
    assert a.shape == (64, 64, 3) and a.std() > 0
    assert np.abs(a - b).max() <= 1  # the same latent; allow one 8-bit step of rounding


def test_out_of_range_timestep_fails_clearly_and_server_keeps_serving(comfy_server):
    entry = comfy_server.run(generate_graph(preset="custom", custom="1200,749", prefix="dmd2_bad"))
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DMD2Generate"
    assert "timestep 1200 is outside 0..999" in error["exception_message"]
    assert error["exception_type"].endswith("ScheduleError")
    # the server still serves: a good prompt right after succeeds
    assert_one_image(comfy_server, comfy_server.run(generate_graph(seed=3, prefix="dmd2_after_bad")))


@pytest.mark.parametrize("graph", [generate_graph, sampler_custom_graph])
def test_malformed_timesteps_are_rejected_at_submit(comfy_server, graph):
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.run(graph(preset="custom", custom="999,abc"))
    assert "'abc' is not an integer" in str(rejected.value.body)
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.run(graph(preset="custom", custom="249,999"))
    assert "strictly descending" in str(rejected.value.body)
    assert_one_image(comfy_server, comfy_server.run(graph(preset="custom", custom="999,499", seed=4, prefix="dmd2_after_400")))


def test_schedule_out_of_range_fails_in_sampler_custom_graph(comfy_server):
    entry = comfy_server.run(sampler_custom_graph(preset="custom", custom="5000"))
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DMD2Schedule"
    assert "outside 0..999" in error["exception_message"]
