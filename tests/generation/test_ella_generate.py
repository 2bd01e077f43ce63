"""ELLA at sampling time, through generate.py's per-call conditioning hook: the TSC is recomputed at
every step for the step's own timestep, "ELLA + CLIP" gives 77 + 64 tokens, and the unconditional
branch is the TSC of the empty prompt."""

import pytest
import torch
from PIL import Image

from sur_lightning.generation.conditioning import ConnectorConditioning, frozen_text_features
from sur_lightning.generation.pipeline import build_pipeline, render
from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector
from sur_lightning.models.llm import T5EncoderFeatures
from sur_lightning.models.random_models import build_tiny_t5_encoder

PROMPT = "three red apples on a table"
STEPS = 3


@pytest.fixture(scope="module")
def ella(cache_dir, backbone):
    """(backbone, tiny T5 features, tiny ELLA at the tiny UNet's width with 64 latents, randomised)."""
    t5 = T5EncoderFeatures(build_tiny_t5_encoder(cache_dir / "tiny-t5"), max_length=16, dtype="float32")
    torch.manual_seed(0)
    connector = TimestepAwareSemanticConnector(
        dim=backbone.cross_attention_dim, llm_dim=t5.hidden_size, num_blocks=2, num_heads=4, time_embed_dim=32
    ).eval()
    with torch.no_grad():  # trained-like: non-zero AdaLN modulation, so the output depends on t everywhere
        for p in connector.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return backbone, t5, connector


def sample(ella, mode):
    backbone, t5, connector = ella
    conditioning = ConnectorConditioning(connector, frozen_text_features(backbone, t5), mode=mode)
    pipeline = build_pipeline(backbone, "ddim")
    calls = []
    # The conditioning hook replaces encoder_hidden_states in a pre-hook on the UNet; a pre-hook on the
    # first cross-attention sees what the UNet actually cross-attends to.
    attn = next(m for name, m in backbone.unet.named_modules() if name.endswith("attn2"))
    handle = attn.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    try:
        images = render(pipeline, conditioning, [PROMPT], [0], num_inference_steps=STEPS, guidance_scale=7.5)
    finally:
        handle.remove()
    return images, calls, pipeline.scheduler.timesteps.clone()


def tsc(ella, prompt, t):
    backbone, t5, connector = ella
    features = frozen_text_features(backbone, t5)([prompt])
    with torch.no_grad():
        return connector(features, torch.tensor([int(t)])).conditioning


def test_tiny_ella_generates_an_image_with_the_tsc_of_every_steps_timestep(ella):
    images, calls, timesteps = sample(ella, mode="replace")
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (64, 64)
    assert len(calls) == STEPS and len(set(timesteps.tolist())) == STEPS
    for states, t in zip(calls, timesteps):
        assert states.shape == (2, 64, 32)  # CFG: [uncond; cond] rows, 64 TSC latents each
        torch.testing.assert_close(states[1:], tsc(ella, PROMPT, t))  # recomputed for this step's t
    assert (calls[0][1] - calls[-1][1]).abs().max() > 1e-3  # and so it changes from step to step


def test_unconditional_branch_is_the_tsc_of_the_empty_prompt(ella):
    _, calls, timesteps = sample(ella, mode="replace")
    for states, t in zip(calls, timesteps):
        torch.testing.assert_close(states[:1], tsc(ella, "", t))
    assert (calls[0][0] - calls[0][1]).abs().max() > 1e-3  # the two branches are conditioned apart


def test_ella_plus_clip_gives_77_plus_64_tokens(ella):
    backbone = ella[0]
    images, calls, timesteps = sample(ella, mode="concat_clip")
    assert len(images) == 1
    for states, t in zip(calls, timesteps):
        assert states.shape == (2, 77 + 64, 32)
        torch.testing.assert_close(states[1:, :77], backbone.encode_prompt([PROMPT]))  # CLIP first ...
        torch.testing.assert_close(states[1:, 77:], tsc(ella, PROMPT, t))  # ... then the TSC of this step
        torch.testing.assert_close(states[:1, :77], backbone.encode_prompt([""]))
        torch.testing.assert_close(states[:1, 77:], tsc(ella, "", t))
