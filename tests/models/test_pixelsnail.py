"""PixelSNAIL (sur_lightning/models/pixelsnail.py): causality, the text condition, seeded sampling, training."""

from __future__ import annotations

import pytest
import torch

from sur_lightning.models.pixelsnail import PixelSNAIL

K, G, P, D, T = 7, 5, 8, 6, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few hundred numbers: a second thread only waits for a core (25 sampling steps took 6 s with two
    threads on the shared 2-core machine, 0.07 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> PixelSNAIL:
    torch.manual_seed(0)
    config = {
        "codebook_size": K,
        "grid_size": G,
        "channels": 16,
        "num_blocks": 2,
        "res_per_block": 1,
        "num_heads": 2,
        "kernel_size": 3,
        "first_kernel_size": 3,
        "pooled_dim": P,
        "token_dim": D,
        "dropout": 0.0,
        "caption_dropout": 0.0,
    }
    return PixelSNAIL(**{**config, **overrides})


def text(batch: int, seed: int = 0, real: int = 3):
    """(pooled [B, P], tokens [B, T, D], mask [B, T] with the first ``real`` tokens real)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    mask[:, :real] = True
    return torch.randn(batch, P, generator=generator), torch.randn(batch, T, D, generator=generator), mask


def codes(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, K, (batch, G, G), generator=torch.Generator().manual_seed(seed))


def dependence(model: PixelSNAIL, base: torch.Tensor) -> torch.Tensor:
    """changed [N, N] bool: changed[j, n] is True when changing only the code at raster position j changes the
    logits at position n (one forward over N variants of ``base`` [G, G])."""
    n = G * G
    variants = base.flatten().repeat(n, 1)  # [N, N]: row j is base with code j changed
    variants[torch.arange(n), torch.arange(n)] = (variants[torch.arange(n), torch.arange(n)] + 1) % K
    with torch.no_grad():
        reference = model(base[None], *text(1)).flatten(2)  # [1, K, N]
        changed = model(variants.view(n, G, G), *(t.expand(n, *t.shape[1:]) for t in text(1))).flatten(2)
    return ((changed - reference).abs().amax(dim=1)) > 1e-5  # [N (changed code j), N (logit position n)]


def test_logits_at_a_position_read_exactly_the_earlier_codes():
    model = tiny().eval()
    changed = dependence(model, codes(1, seed=1)[0])
    later_or_same = torch.ones(G * G, G * G, dtype=torch.bool).tril()  # [j, n] with n <= j
    assert not changed[later_or_same].any(), (
        f"a code changes the logits at or before its own position: {changed.nonzero()}"
    )
    assert changed[~later_or_same].all(), (
        "every earlier code must reach every later position (attention covers the blind spot)"
    )


def test_changing_all_later_codes_at_once_leaves_the_logits_unchanged():
    model = tiny().eval()
    base, noise = codes(1, seed=2)[0].flatten(), codes(1, seed=3)[0].flatten()
    n = G * G
    variants = base.repeat(n, 1)
    for i in range(n):  # row i: every code after position i replaced by a different one
        variants[i, i + 1 :] = (base[i + 1 :] + 1 + noise[i + 1 :] % (K - 1)) % K
    with torch.no_grad():
        reference = model(base.view(1, G, G), *text(1)).flatten(2)[0]
        out = model(variants.view(n, G, G), *(t.expand(n, *t.shape[1:]) for t in text(1))).flatten(2)
    for i in range(n):
        torch.testing.assert_close(out[i, :, : i + 1], reference[:, : i + 1], atol=1e-5, rtol=0)


def test_the_causality_check_sees_a_leak():
    model = tiny().eval()
    centre = model.first.mask.shape[-1] // 2
    model.first.mask[..., centre, centre] = 1  # the first convolution now reads the code it predicts
    changed = dependence(model, codes(1, seed=1)[0])
    assert changed.diagonal().any()


def test_the_text_condition_and_its_padding_mask():
    model = tiny().eval()
    grid = codes(2, seed=4)
    pooled, tokens, mask = text(2)
    with torch.no_grad():
        reference = model(grid, pooled, tokens, mask)
        padded = tokens.clone()
        padded[:, 3:] += 5.0  # tokens 3.. are padding: never attended
        torch.testing.assert_close(model(grid, pooled, padded, mask), reference)
        real = tokens.clone()
        real[:, 0] += 1.0
        assert (model(grid, pooled, real, mask) - reference).abs().amax() > 1e-4
        assert (model(grid, pooled + 1.0, tokens, mask) - reference).abs().amax() > 1e-4
        # A dropped caption reads the null caption, whatever the caption was.
        drop = torch.tensor([True, False])
        dropped = model(grid, pooled, tokens, mask, drop=drop)
        other = model(grid, *text(2, seed=9), drop=drop)
        torch.testing.assert_close(dropped[0], other[0])
        torch.testing.assert_close(dropped[1], reference[1])
    with pytest.raises(ValueError, match=r"rows \[1\] of text_mask have no real token"):
        model(grid, pooled, tokens, torch.tensor([[True] * T, [False] * T]))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampling_is_deterministic_per_seed(guidance_scale):
    model = tiny()
    condition = text(2)

    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.sample(*condition, temperature=1.0, guidance_scale=guidance_scale, generator=generator)

    first = draw(0)
    assert first.shape == (2, G, G) and first.dtype == torch.int64
    assert 0 <= int(first.min()) and int(first.max()) < K
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))
    assert model.training, "sample() restores the training mode"


def test_a_training_step_reduces_the_loss_and_trains_the_null_caption():
    model = tiny(caption_dropout=0.5).train()
    grid, condition = codes(4, seed=5), text(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        loss = model.loss(grid, *condition, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[0] == pytest.approx(
        torch.log(torch.tensor(float(K))).item(), abs=0.02
    )  # uniform at init (small head)
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.null_pooled.abs().sum() > 0, "dropped captions train the null caption"


def test_save_and_load_round_trip(tmp_path):
    model = tiny().eval()
    model.save_pretrained(tmp_path / "prior")
    loaded = PixelSNAIL.from_pretrained(tmp_path / "prior").eval()
    grid, condition = codes(1, seed=6), text(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(grid, *condition), model(grid, *condition))
