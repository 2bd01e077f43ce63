"""The VQ tokenizer (sur_lightning/models/vq_tokenizer.py): shapes, determinism, files, and the checker gate."""

from __future__ import annotations

import random

import pytest
import torch

from sur_lightning.models.vq_tokenizer import CodebookNotFittedError, LatentVQTokenizer


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    """A random x2 VAE (16 px images -> 4x8x8 latents), saved as an SD folder's ``vae/``."""
    from sur_lightning.toyworld.base_model import build_vae

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vae")
    build_vae(block_out_channels=(8, 16), norm_num_groups=4).save_pretrained(folder / "vae")
    return str(folder)


def images(n: int, side: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_tokenizer_round_trips_shapes_and_codes_deterministically(tiny_vae, tmp_path):
    tokenizer = LatentVQTokenizer(tiny_vae, codebook_size=16)
    x = images(4, 16, seed=1)
    with pytest.raises(CodebookNotFittedError, match="never fitted"):
        tokenizer.eval().encode(x)
    torch.manual_seed(0)
    out = tokenizer.train()(images(8, 16, seed=2))  # the first training batch fits the codebook (k-means)
    assert tokenizer.fitted and out["reconstruction"].shape == (8, 3, 16, 16)
    tokenizer.eval()
    codes = tokenizer.encode(x)
    assert codes.shape == (4, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    assert torch.equal(codes, tokenizer.encode(x)), "eval-mode encoding must not move the codebook"
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (4, 3, 16, 16) and decoded.abs().max() <= 1
    # The decoded latents are exactly the codebook vectors: quantising them again gives the same codes.
    assert torch.equal(tokenizer.quantize(tokenizer.codes_to_latents(codes))[1], codes)
    loaded = LatentVQTokenizer.from_pretrained(tokenizer.save_pretrained(tmp_path / "tok"))
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert torch.equal(loaded.encode(x), codes)
    with pytest.raises(ValueError, match="outside the codebook"):
        tokenizer.decode(torch.full((1, 8, 8), 16))


def test_training_moves_the_codebook_and_eval_does_not(tiny_vae):
    tokenizer = LatentVQTokenizer(tiny_vae, codebook_size=16).train()
    torch.manual_seed(0)
    tokenizer(images(8, 16, seed=2), reconstruct=False)
    fitted = tokenizer.fingerprint()
    tokenizer(images(8, 16, seed=3), reconstruct=False)
    assert tokenizer.fingerprint() != fitted, "a training batch moves the codebook (EMA)"
    moved = tokenizer.fingerprint()
    tokenizer.eval()(images(8, 16, seed=4), reconstruct=False)
    assert tokenizer.fingerprint() == moved


def test_shipped_vae_codes_pass_the_checker_gate():
    """On the toy world's VAE, a codebook fitted on 16 images decodes 16 fresh ones the checker reads right."""
    from sur_lightning.data.datasets import preprocess
    from sur_lightning.evaluation.metrics.shapes import check
    from sur_lightning.toyworld import shipped_base
    from sur_lightning.toyworld.world import random_complex_example

    rng = random.Random(0)

    def world(n):
        drawn = [random_complex_example(rng) for _ in range(n)]
        return torch.stack([preprocess(image, 64, True, False) for image, _, _ in drawn]), [t for _, _, t in drawn]

    tokenizer = LatentVQTokenizer(shipped_base(), codebook_size=256)
    torch.manual_seed(0)
    tokenizer.train()(world(16)[0], reconstruct=False)
    x, targets = world(16)
    codes = tokenizer.eval().encode(x)
    assert codes.shape == (16, 16, 16)
    reconstructions = (tokenizer.decode(codes) + 1) / 2
    results = [check(image, target=target) for image, target in zip(reconstructions, targets)]
    for key in ("count", "color", "shape", "valid"):
        assert sum(r[key] for r in results) >= 15, (key, results)


def test_a_hub_vae_that_cannot_be_loaded_names_the_key():
    from sur_lightning.models.vq_tokenizer import LatentVQTokenizer

    with pytest.raises(FileNotFoundError, match="backbone.pretrained"):
        LatentVQTokenizer("nobody-h35b/no-such-model")
