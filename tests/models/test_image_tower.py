"""The toy world's image tower (issue 34): its loss, save/load, its training command, the shipped tower's hash and
gate, and the offline CLIP scorer built on it."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import torch

from sur_lightning.evaluation.rerank import ImageTowerScorer
from sur_lightning.models.image_tower import ImageTower
from sur_lightning.toyworld import (
    IMAGE_TOWER_DIR,
    IMAGE_TOWER_RECORD,
    shipped_base,
    shipped_image_tower,
    verify_base,
    verify_image_tower,
    world,
)

TINY = {"channels": (8, 8, 16, 16), "text_dim": 12, "embedding_dim": 6, "groups": 4}


def test_contrastive_loss_has_its_known_value_on_aligned_embeddings(monkeypatch):
    """Row i's image and text embed to the same one-hot vector: every logit is scale·[i == j], so both directions
    give -log(e^s / (e^s + B - 1))."""
    tower = ImageTower(**TINY, init_temperature=0.5)
    batch = 4
    eye = torch.eye(batch, 6)
    monkeypatch.setattr(tower, "embed_images", lambda pixels: eye)
    monkeypatch.setattr(tower, "embed_texts", lambda pooled: eye)
    scale = 2.0  # 1 / 0.5
    expected = -math.log(math.exp(scale) / (math.exp(scale) + batch - 1))
    loss = tower.contrastive_loss(torch.zeros(batch, 3, 64, 64), torch.zeros(batch, 12))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Swapping two texts makes those rows wrong in both directions: the loss rises.
    monkeypatch.setattr(tower, "embed_texts", lambda pooled: eye[[1, 0, 2, 3]])
    assert tower.contrastive_loss(torch.zeros(batch, 3, 64, 64), torch.zeros(batch, 12)).item() > expected + 1


def test_the_temperature_is_learned_and_capped_at_100():
    tower = ImageTower(**TINY)
    assert tower.temperature_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    loss = tower.contrastive_loss(torch.randn(3, 3, 64, 64), torch.randn(3, 12))
    loss.backward()
    assert tower.logit_scale.grad is not None and tower.logit_scale.grad.abs() > 0
    with torch.no_grad():
        tower.logit_scale.fill_(10.0)
    assert tower.temperature_scale().item() == pytest.approx(100.0)


def test_embeddings_are_unit_length_refuse_other_sizes_and_round_trip(tmp_path):
    tower = ImageTower(**TINY).eval()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    embedding = tower.embed_images(pixels)
    assert embedding.shape == (2, 6)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match=r"expected pixels \[B, 3, 64, 64\]"):
        tower.embed_images(torch.zeros(2, 3, 32, 32))
    tower.save_pretrained(tmp_path / "tower")
    assert (tmp_path / "tower" / "config.json").is_file()
    assert (tmp_path / "tower" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ImageTower.from_pretrained(tmp_path / "tower").eval()
    assert list(loaded.config.channels) == [8, 8, 16, 16]
    torch.testing.assert_close(loaded.embed_images(pixels), embedding)


# ---------------------------------------------------------------- the training command


def test_the_training_command_exports_a_tower_whose_hash_is_checked(tmp_path):
    export = tmp_path / "tower"
    command = [
        sys.executable,
        "-m",
        "sur_lightning.toyworld.image_tower",
        f"export_dir={export}",
        "steps=3",
        "warmup=1",
        "eval.images_per_target=1",
        "model.channels=[8,8,16,16]",
        "model.embedding_dim=8",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    record = verify_image_tower(export)
    assert (
        record["command"] == f"python -m sur_lightning.toyworld.image_tower export_dir={export} steps=3 warmup=1 "
        "eval.images_per_target=1 model.channels=[8,8,16,16] model.embedding_dim=8"
    )
    assert record["retrieval"]["images"] == 54 and 0 <= record["retrieval"]["top1_exact"] <= 1
    assert record["environment"]["threads"] == 1
    tower = ImageTower.from_pretrained(shipped_image_tower(export))
    assert tower.config.embedding_dim == 8 and tower.config.text_dim == 128


def test_training_is_reproducible_with_pinned_threads():
    """The same config trains the same weights bit for bit (what lets image_tower.json record one SHA-256)."""
    from hydra import compose, initialize_config_dir

    from sur_lightning.config import CONFIG_DIR
    from sur_lightning.toyworld.image_tower import train

    overrides = [
        "steps=2",
        "warmup=1",
        "eval.images_per_target=1",
        "model.channels=[8,8,16,16]",
        "model.embedding_dim=8",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="toyworld_image_tower", overrides=overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        runs = [train(cfg) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    (first, measured, _), (second, measured_again, _) = runs
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert measured == measured_again


def test_a_damaged_tower_file_is_named(tmp_path):
    copy = tmp_path / "image_tower"
    shutil.copytree(IMAGE_TOWER_DIR, copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="image_tower/diffusion_pytorch_model.safetensors has SHA-256"):
        shipped_image_tower(copy)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors is missing"):
        verify_image_tower(copy)
    (copy / IMAGE_TOWER_RECORD).unlink()
    with pytest.raises(FileNotFoundError, match=IMAGE_TOWER_RECORD):
        verify_image_tower(copy)


# ---------------------------------------------------------------- the shipped tower


def test_shipped_tower_matches_its_hash_passed_its_gate_and_reads_the_shipped_base():
    record = verify_image_tower()
    assert record["retrieval"]["top1_exact"] >= 0.95 and record["retrieval"]["passed"]
    assert record["retrieval"]["images"] >= 1000
    assert (
        record["command"]
        == "python -m sur_lightning.toyworld.image_tower export_dir=sur_lightning/toyworld/base/image_tower"
    )
    # The tower reads the base's text encoder: a retrained base would need a retrained tower.
    assert record["text_encoder"]["sha256"] == verify_base()["sha256"]["text_encoder/model.safetensors"]
    # Shipped as package data and committed (the .gitignore exception for the base's safetensors).
    pyproject = (IMAGE_TOWER_DIR.parents[3] / "pyproject.toml").read_text()
    assert '"base/*/*.safetensors"' in pyproject and '"base/*/*.json"' in pyproject
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(IMAGE_TOWER_DIR / "diffusion_pytorch_model.safetensors")],
        check=False,
        cwd=IMAGE_TOWER_DIR,
        capture_output=True,
    )
    assert ignored.returncode == 1, "the shipped tower's weights are git-ignored"
    assert json.loads((IMAGE_TOWER_DIR / "config.json").read_text())["_class_name"] == "ImageTower"


@pytest.fixture(scope="module")
def scorer():
    return ImageTowerScorer(shipped_image_tower(), shipped_base())


def test_the_shipped_tower_retrieves_fresh_images_of_every_target(scorer):
    """One new image of each of the 54 targets (a stream of its own): the nearest complex prompt is its own."""
    targets = world.all_targets()
    rng = random.Random("test-image-tower")
    images = [world.draw_example(*target, rng) for target in targets]
    similarity = scorer.embed_images(images) @ scorer.embed_texts([world.complex_prompt(*t) for t in targets]).T
    accuracy = (similarity.argmax(dim=1) == torch.arange(len(targets))).float().mean().item()
    assert accuracy >= 0.95


def test_the_scorer_ranks_the_matching_image_first(scorer):
    from torchvision.transforms.functional import to_tensor

    rng = random.Random(3)
    candidates = [
        world.draw_example(*target, rng)
        for target in [(3, "red", "circle"), (2, "red", "circle"), (2, "blue", "circle"), (2, "red", "square")]
    ]
    prompt = world.complex_prompt(2, "red", "circle")
    scores = scorer.score(candidates, [prompt] * 4)
    assert scores.shape == (4,) and scores.abs().max() <= 1 + 1e-5
    assert int(scores.argmax()) == 1, scores
    # A tensor [B, 3, H, W] in [0, 1] scores the same, and other sizes are resized to the tower's.
    pixels = torch.stack([to_tensor(image) for image in candidates])
    torch.testing.assert_close(scorer.score(pixels, [prompt] * 4), scores, atol=1e-5, rtol=0)
    assert int(scorer.score(torch.nn.functional.interpolate(pixels, size=128), [prompt] * 4).argmax()) == 1
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(candidates[:2], [prompt])


def test_best_of_n_composes_the_image_tower_scorer():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sur_lightning.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="explore", overrides=["tool=best_of_n", "tool/scorer=image_tower", "tool.scorer_text=complex"]
        )
    scorer = instantiate(cfg.tool.scorer)
    assert isinstance(scorer, ImageTowerScorer) and cfg.tool.scorer_text == "complex"
