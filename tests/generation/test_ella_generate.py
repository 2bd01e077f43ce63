"""ELLA at sampling time, through generate.py's per-call conditioning hook: the TSC is recomputed at
every step for the step's own timestep, "ELLA + CLIP" gives 77 + 64 tokens, the unconditional
branch is the TSC of the empty prompt, and ``variant_mean`` averages the TSC over renamed variants."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sur_lightning.generation.conditioning import (
    ConnectorConditioning,
    VariantMeanConditioning,
    frozen_text_features,
)
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


def renamed(prompt: str, k: int) -> str | None:
    """A stand-in for name dropout's ``variant``: the apples renamed to placeholder k; None without apples."""
    return prompt.replace("apples", f"zorbs{k}") if "apples" in prompt else None


def test_variant_mean_conditions_on_the_mean_tsc_over_the_renamed_variants(ella):
    backbone, t5, connector = ella
    read = []
    plain = frozen_text_features(backbone, t5)

    def text_features(prompts):
        read.append(list(prompts))
        return plain(prompts)

    conditioning = VariantMeanConditioning(connector, text_features, renamed, variants=3)
    features = conditioning.features([PROMPT, "a table"])
    # One LLM call, variant-major: the prompts themselves (variant 0), then variants 1 and 2 (a prompt that
    # names no object stays as it is).
    assert read == [[PROMPT, "a table", renamed(PROMPT, 1), "a table", renamed(PROMPT, 2), "a table"]]
    torch.testing.assert_close(features.clip, backbone.encode_prompt([PROMPT, "a table"]))  # the prompts' own CLIP
    assert features.llm.shape[0] == 6 and features.prompts == [PROMPT, "a table"]
    t = torch.tensor([500, 500])
    expected = torch.stack([tsc(ella, p, 500) for p in (PROMPT, renamed(PROMPT, 1), renamed(PROMPT, 2))]).mean(0)
    out = conditioning.apply(features, t)
    assert out.shape == (2, 64, 32)
    # (Padded to the longest variant in one batch: equal to the separate calls up to float error.)
    torch.testing.assert_close(out[:1], expected, rtol=1e-3, atol=5e-4)
    torch.testing.assert_close(out[1:], tsc(ella, "a table", 500), rtol=1e-3, atol=5e-4)
    assert (out[:1] - tsc(ella, PROMPT, 500)).abs().max() > 1e-2  # not variant 0 alone
    # One variant is the connector read as it is.
    single = VariantMeanConditioning(connector, plain, renamed, variants=1)
    torch.testing.assert_close(
        single.apply(single.features([PROMPT]), t[:1]), tsc(ella, PROMPT, 500), rtol=1e-4, atol=1e-5
    )


def test_variant_mean_draws_through_the_hook_and_needs_an_llm_that_renames(ella, tmp_path):
    from sur_lightning.generation.columns import build_columns
    from sur_lightning.models.connectors import save_connector

    backbone, t5, connector = ella
    conditioning = VariantMeanConditioning(connector, frozen_text_features(backbone, t5), renamed, variants=2)
    images = render(build_pipeline(backbone, "ddim"), conditioning, [PROMPT], [0], num_inference_steps=2)
    assert len(images) == 1 and images[0].size == (64, 64)
    weights, _ = save_connector(connector, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"adapter\.safetensors: variant_mean .* renames nothing"):
        build_columns(backbone, [str(weights)], llm=t5, variant_mean=True)

    class RenamingLLM(torch.nn.Module):
        """The T5 features behind a retriever that renames, as the LLM of +experiment=ella_unseen_objects is."""

        def __init__(self, variant_mean: bool) -> None:
            super().__init__()
            self.t5 = t5
            renamer = SimpleNamespace(variant=renamed, variants=2)
            self.rag = SimpleNamespace(renamer=renamer, variant_mean=variant_mean)

        def forward(self, prompts):
            return self.t5(prompts)

    # Unset, the LLM's rag.variant_mean decides (what generate and evaluate read from the adapter's record) ...
    for recorded in (True, False):
        (column,) = build_columns(backbone, [str(weights)], llm=RenamingLLM(recorded), include_base=False)
        assert isinstance(column.conditioning, VariantMeanConditioning) == recorded
    # ... and a setting given wins, for all adapters or one.
    (column,) = build_columns(backbone, [str(weights)], llm=RenamingLLM(True), include_base=False, variant_mean=False)
    assert type(column.conditioning) is ConnectorConditioning
    adapters = {"mine": {"path": str(weights), "variant_mean": True}}
    (column,) = build_columns(backbone, adapters, llm=RenamingLLM(False), include_base=False)
    assert isinstance(column.conditioning, VariantMeanConditioning) and column.source["variant_mean"] == 2
