"""unCLIP's diffusion prior (issue 34, models/prior.py): its training step, seeded sampling, and the traps of
diffusers' PriorTransformer it handles (the causal mask, padding to num_embeddings, the fitted statistics)."""

from __future__ import annotations

import random

import pytest
import torch

from sur_lightning.models.image_tower import ImageTower
from sur_lightning.models.prior import PRIOR_SCHEDULER, DiffusionPrior
from sur_lightning.toyworld import shipped_image_tower, world

TINY = {
    "text_dim": 12,
    "pooled_dim": 10,
    "embedding_dim": 16,
    "num_embeddings": 6,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
}


def text(batch: int, length: int = 4, seed: int = 0):
    """Random token states [B, L, 12], a mask with the last token padded in row 0, pooled [B, 10]."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -1] = False
    return torch.randn(batch, length, 12, generator=generator), mask, torch.randn(batch, 10, generator=generator)


def fitted_prior(seed: int = 0, **changes) -> DiffusionPrior:
    """The TINY prior (with ``changes`` to its config), statistics fitted on random unit vectors."""
    torch.manual_seed(seed)
    prior = DiffusionPrior(**(TINY | changes))
    prior.fit_embedding_stats(torch.nn.functional.normalize(torch.randn(32, prior.config.embedding_dim), dim=-1))
    return prior


def tower_embeddings(count: int) -> torch.Tensor:
    """The shipped image tower's embeddings [count, 128] of fresh world images."""
    from sur_lightning.toyworld.image_tower import to_pixels

    tower = ImageTower.from_pretrained(shipped_image_tower()).eval()
    rng = random.Random("test-prior")
    images = [world.random_complex_example(rng)[0] for _ in range(count)]
    with torch.no_grad():
        return tower.embed_images(to_pixels(images))


def test_the_stats_are_fitted_from_the_towers_embeddings_and_never_trained():
    embeds = tower_embeddings(40)
    prior = DiffusionPrior(**(TINY | {"embedding_dim": 128}))
    states, mask, pooled = text(2)
    with pytest.raises(ValueError, match="clip_std is zero.*fit_embedding_stats"):
        prior.training_loss(embeds[:2], states, mask, pooled)
    with pytest.raises(ValueError, match="clip_std is zero"):
        prior.sample(states, mask, pooled)
    prior.fit_embedding_stats(embeds)
    torch.testing.assert_close(prior.transformer.clip_mean[0], embeds.mean(0))
    torch.testing.assert_close(prior.transformer.clip_std[0], embeds.std(0))
    standardised = prior.standardise(embeds)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(128), atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.unstandardise(standardised), embeds, atol=1e-6, rtol=0)
    prior.training_loss(embeds[:2], states, mask, pooled).backward()
    assert prior.transformer.clip_mean.grad is None and prior.transformer.clip_std.grad is None
    assert prior.text_proj.weight.grad is not None
    with pytest.raises(ValueError, match=r"expected \[N >= 2, 128\]"):
        prior.fit_embedding_stats(embeds[:, :16])


def test_the_training_step_reduces_the_loss_on_a_tiny_batch():
    prior = fitted_prior()
    embeds = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    states, mask, pooled = text(8)

    def fixed_loss() -> float:  # the same noise and timesteps before and after training
        with torch.no_grad():
            return prior.training_loss(embeds, states, mask, pooled, generator=torch.Generator().manual_seed(5)).item()

    before = fixed_loss()
    optimizer = torch.optim.AdamW([p for p in prior.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = prior.training_loss(embeds, states, mask, pooled, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.5 * before


def test_sampling_is_deterministic_per_seed_and_reads_the_text():
    prior = fitted_prior().eval()
    states, mask, pooled = text(3)
    first = prior.sample(states, mask, pooled, generator=0, num_inference_steps=5)
    assert first.shape == (3, 16) and torch.isfinite(first).all()
    torch.testing.assert_close(
        prior.sample(states, mask, pooled, generator=0, num_inference_steps=5), first, atol=0, rtol=0
    )
    assert not torch.allclose(prior.sample(states, mask, pooled, generator=1, num_inference_steps=5), first)
    other_states, _, other_pooled = text(3, seed=9)
    assert not torch.allclose(prior.sample(other_states, mask, other_pooled, generator=0, num_inference_steps=5), first)
    # Guidance against the unconditional features: seeded too, and 1.0 is the plain conditional sample.
    negative = (torch.zeros(1, 2, 12), None, torch.zeros(1, 10))
    guided = prior.sample(
        states, mask, pooled, generator=0, num_inference_steps=5, guidance_scale=3.0, negative=negative
    )
    torch.testing.assert_close(
        prior.sample(states, mask, pooled, generator=0, num_inference_steps=5, guidance_scale=3.0, negative=negative),
        guided,
    )
    assert not torch.allclose(guided, first)
    torch.testing.assert_close(
        prior.sample(states, mask, pooled, generator=0, num_inference_steps=5, guidance_scale=1.0, negative=negative),
        first,
    )


def test_the_causal_mask_is_applied_and_padding_is_never_read():
    """Text positions come first, so with the causal mask no text position's state reads the noised embedding;
    the query (last) reads everything; padded tokens change nothing."""
    prior = fitted_prior().eval()
    states, mask, pooled = text(2)
    timesteps = torch.tensor([10, 500])
    captured = []
    hook = prior.transformer.transformer_blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = prior(x, timesteps, states, mask, pooled)
        out_other_x = prior(x + 1, timesteps, states, mask, pooled)
    hook.remove()
    n = TINY["num_embeddings"]
    torch.testing.assert_close(captured[0][:, :n], captured[1][:, :n])  # the text never sees x_t
    assert not torch.allclose(out, out_other_x)  # the query does
    changed = states.clone()
    changed[0, -1] += 100.0  # row 0's last token is padding
    with torch.no_grad():
        torch.testing.assert_close(prior(x, timesteps, changed, mask, pooled), out)
        changed[1, -1] += 100.0  # row 1's last token is real
        assert not torch.allclose(prior(x, timesteps, changed, mask, pooled)[1], out[1])


def test_text_longer_than_num_embeddings_is_refused_and_the_schedule_never_clips():
    prior = fitted_prior()
    states, mask, pooled = text(1, length=TINY["num_embeddings"] + 1)
    with pytest.raises(ValueError, match="7 tokens but the prior reads num_embeddings=6"):
        prior(torch.zeros(1, 16), torch.tensor([3]), states, mask, pooled)
    assert PRIOR_SCHEDULER["clip_sample"] is False and PRIOR_SCHEDULER["prediction_type"] == "sample"


def test_save_and_load_keep_the_fitted_stats(tmp_path):
    prior = fitted_prior().eval()
    prior.save_pretrained(tmp_path / "prior")
    loaded = DiffusionPrior.from_pretrained(tmp_path / "prior").eval()
    states, mask, pooled = text(2)
    torch.testing.assert_close(loaded.transformer.clip_std, prior.transformer.clip_std)
    torch.testing.assert_close(
        loaded.sample(states, mask, pooled, generator=3, num_inference_steps=3),
        prior.sample(states, mask, pooled, generator=3, num_inference_steps=3),
    )


def test_the_stock_transformer_folds_the_text_projection_in_and_keeps_the_statistics():
    from diffusers import PriorTransformer

    prior = fitted_prior(text_dim=16)
    stock = prior.stock_transformer()
    assert type(stock) is PriorTransformer and not stock.training
    assert torch.equal(stock.clip_std, prior.transformer.clip_std) and torch.equal(
        stock.clip_mean, prior.transformer.clip_mean
    )
    generator = torch.Generator().manual_seed(2)
    states = torch.randn(3, TINY["num_embeddings"], 16, generator=generator)
    mask = torch.ones(3, TINY["num_embeddings"], dtype=torch.bool)
    mask[0, 2:] = False  # padded: the states there stay non-zero for the stock transformer, zeroed by the prior
    mask[1, 4:] = False
    pooled, noisy = torch.randn(3, 10, generator=generator), torch.randn(3, 16, generator=generator)
    timesteps = torch.tensor([900, 300, 5])
    with torch.no_grad():
        expected = prior(noisy, timesteps, states, mask, pooled)
        got = stock(noisy, timesteps, proj_embedding=pooled, encoder_hidden_states=states, attention_mask=mask)
    torch.testing.assert_close(got.predicted_image_embedding, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stock.post_process_latents(noisy), prior.unstandardise(noisy))
    with pytest.raises(ValueError, match="text_dim == embedding_dim"):
        fitted_prior().stock_transformer()  # text_dim 12, embedding_dim 16
