"""Stable Diffusion 3 / 3.5 (Medium and Large): the MMDiT, rectified flow on a static shift of 3,
real score by classifier-free guidance (no embedded guidance), three text encoders. The second
flow family (#25): what differs from Flux is the network (one stack of joint blocks, timesteps
x 1000), the conditioning and the guidance; the process and the flow prediction are shared."""

from __future__ import annotations

from .core import MODEL_READERS, Family, RectifiedFlow, TransformerNetwork, register

# The scheduler as diffusers ships it: stabilityai/stable-diffusion-3.5-large and -medium,
# scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler): num_train_timesteps 1000,
# shift 3.0 (static); ComfyUI's supported_models.SD3 sampling_settings: shift 3.0.
SD3_SHIFT = 3.0
# ComfyUI's ModelSamplingDiscreteFlow.timestep(sigma) = sigma * multiplier, multiplier 1000 by
# default (SD3's sampling_settings set none): the MMDiT's timestep embedding takes 1000 * t.
TIME_MULTIPLIER = 1000.0
# The cards' guidance (the real score's CFG scale a recipe starts from): SD3.5 Large
# pipe(..., num_inference_steps=28, guidance_scale=3.5); SD3.5 Medium num_inference_steps=40,
# guidance_scale=4.5 (huggingface.co/stabilityai/stable-diffusion-3.5-large, -medium).
CARD_GUIDANCE = {"large": 3.5, "medium": 4.5}

# LoRA targets as module paths inside ComfyUI's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py):
# each joint block's context_block and x_block have attn.qkv/attn.proj and mlp.fc1/fc2; SD3.5
# Medium's x blocks add a second self-attention (attn2). "all" adds the adaLN modulation and the
# embedding/output projections.
ATTENTION_MLP_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")
EMBEDDING_TARGETS = ("context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                     "final_layer.linear")
SD3_TARGET_SETS = {"dmd2": ATTENTION_MLP_TARGETS, "attention+mlp": ATTENTION_MLP_TARGETS,
                   "all": ATTENTION_MLP_TARGETS + ("adaLN_modulation.1",) + EMBEDDING_TARGETS}


class MMDiTNetwork(TransformerNetwork):
    """ComfyUI's ``OpenAISignatureMMDITWrapper``: called with 1000 * t, the text tokens (CLIP-L/G
    padded to 4096 and T5-XXL, concatenated) as ``context`` and the pooled CLIP-L+G vector as
    ``y``; no guidance input. Its residual adds are out of place already; the GAN head reads the
    image tokens leaving the middle joint block (a joint block returns (context, x))."""

    target_sets = SD3_TARGET_SETS
    gan_output_index = 1

    def forward(self, module, x_t, t, context, y, guidance, options):
        return module(x_t, t * TIME_MULTIPLIER, context=context, y=y, transformer_options=options)

    def checkpoint_blocks(self):
        from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock

        return (JointBlock,)

    def gan_block(self, module):
        return module.joint_blocks[max(0, len(module.joint_blocks) // 2 - 1)]


MMDIT_NETWORK = MMDiTNetwork()
_SD3_PROCESS = RectifiedFlow(SD3_SHIFT)  # built at import (as sd.py's)

# CLIP-L/G + T5-XXL tokens 4096 wide, the pooled CLIP-L (768) + CLIP-G (1280) vector; the
# unconditional side is the empty prompt's encoding (diffusers' StableDiffusion3Pipeline
# encodes negative_prompt "" by default).
SD3 = register(Family("sd3", "SD3.5", prediction="flow", resolution=1024, context_dim=4096,
                      text_encoders=("clip_l", "clip_g", "t5xxl"), pooled=True, uncond="empty", one_step_timestep=999,
                      network=MMDIT_NETWORK, make_process=lambda zsnr: _SD3_PROCESS))


def sd3_family(base_model, model_sampling) -> Family | None:
    """SD3 on the model's own flow sampling for a ComfyUI SD3 / SD3.5 BaseModel; None otherwise."""
    import comfy.model_base as mb
    import comfy.supported_models as sm

    from .flux import flow_process

    config = getattr(base_model, "model_config", None)
    if type(base_model) is not mb.SD3 or not isinstance(config, sm.SD3):
        return None
    return SD3.with_process(flow_process(model_sampling))


MODEL_READERS.append(sd3_family)
