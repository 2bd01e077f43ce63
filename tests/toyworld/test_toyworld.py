"""The toy world: its checker, its splits, the shipped base model and the pretraining script."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_demo_overrides

from sur_lightning.data.synthetic import COLORS, SHAPES
from sur_lightning.evaluation.metrics import shapes
from sur_lightning.toyworld import BASE_DIR, shipped_base, verify_base, world

# ---------------------------------------------------------------- the checker


def world_images(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [world.random_complex_example(rng) for _ in range(n)]


def accuracies(images, targets) -> dict[str, float]:
    checks = [shapes.check(image, target=target) for image, target in zip(images, targets)]
    return {key: float(np.mean([c[key] for c in checks])) for key in ("count", "color", "shape")}


def test_checker_reads_the_generators_own_images():
    examples = world_images(300)
    scores = accuracies([e[0] for e in examples], [e[2] for e in examples])
    assert min(scores.values()) >= 0.98, scores
    # Every (count, colour, shape) occurs, so no attribute is scored on one value only.
    assert {e[2] for e in examples} == {(c, col, s) for c in world.COUNTS for col in COLORS for s in SHAPES}


@torch.no_grad()
def test_checker_reads_the_shipped_vae_reconstructions():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(shipped_base(), subfolder="vae", torch_dtype=torch.float32).eval()
    examples = world_images(108, seed=1)
    pixels = torch.stack([torch.from_numpy(np.asarray(e[0], dtype=np.float32)) for e in examples])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    images = [((x.clamp(-1, 1) + 1) / 2) for x in decoded]
    scores = accuracies(images, [e[2] for e in examples])
    assert min(scores.values()) >= 0.98, scores


def test_checker_rejects_wrong_targets():
    image, _, (count, color, shape) = world_images(1, seed=3)[0]
    other_color = next(c for c in COLORS if c != color)
    other_shape = next(s for s in SHAPES if s != shape)
    assert shapes.check(image, target=(count, color, shape)) == {
        "count": True,
        "color": True,
        "shape": True,
        "exact": True,
        "valid": True,
    }
    assert shapes.check(image, target=(count, other_color, other_shape)) == {
        "count": True,
        "color": False,
        "shape": False,
        "exact": False,
        "valid": True,  # valid whatever the target
    }


# ---------------------------------------------------------------- the splits


def test_splits_are_deterministic_and_disjoint():
    a, b = world.make_splits(0), world.make_splits(0)
    assert a == b
    assert world.make_splits(1) != a
    train, combos, objects = set(a.adapter_train), set(a.held_out_combinations), set(a.held_out_objects)
    assert not (train & combos) and not (train & objects) and not (combos & objects)
    held_objects = {name for name, _ in objects}
    assert len(held_objects) == world.NUM_HELD_OUT_OBJECTS
    assert not held_objects & {name for name, _ in train}
    # Every held-out combination pairs an object and a quantity that both occur in training.
    assert all(name in {n for n, _ in train} and count in {c for _, c in train} for name, count in combos)
    # Every colour and shape of a held-out object is shown by some training object.
    train_objects = [world.OBJECTS_BY_NAME[n] for n, _ in train]
    for name in held_objects:
        obj = world.OBJECTS_BY_NAME[name]
        assert any(t.color == obj.color for t in train_objects) and any(t.shape == obj.shape for t in train_objects)


def clip_tokens(tokenizer, text: str) -> set[int]:
    return set(tokenizer(text, add_special_tokens=False).input_ids)


def test_held_out_combinations_use_only_tokens_seen_in_training(tmp_path):
    """Split by token, not by concept: otherwise a "held-out combination" is really a held-out object."""
    from transformers import CLIPTokenizer

    from sur_lightning.models.backbone import write_clip_tokenizer_files

    files = write_clip_tokenizer_files(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    out = world.write_world(tmp_path / "world", images_per_combo=4)
    rows = [json.loads(line) for line in (out / "adapter_train" / "metadata.jsonl").read_text().splitlines()]
    seen = set().union(*(clip_tokens(tokenizer, r["text"]) for r in rows))
    combos = [json.loads(line) for line in (out / "suites" / "held_out_combinations.jsonl").read_text().splitlines()]
    for row in combos:
        assert clip_tokens(tokenizer, row["prompt"]) <= seen, row["prompt"]
    # Held-out object words never occur in adapter-train prompts.
    objects = [json.loads(line) for line in (out / "suites" / "held_out_objects.jsonl").read_text().splitlines()]
    train_text = " ".join(r["text"] for r in rows)
    for row in objects:
        obj = world.OBJECTS_BY_NAME[row["object"]]
        assert not re.search(rf"\b({obj.name}|{obj.plural})\b", train_text)


def test_world_folder_manifest_and_suites(tmp_path):
    out = world.write_world(tmp_path / "world", seed=0, images_per_combo=3)
    manifest = json.loads((out / "manifest.json").read_text())
    splits = world.make_splits(0)
    assert manifest["splits"]["held_out_combinations"] == [list(c) for c in splits.held_out_combinations]
    rows = [json.loads(line) for line in (out / "adapter_train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(splits.adapter_train)
    first = rows[0]
    obj = world.OBJECTS_BY_NAME[first["object"]]
    assert first["prompt"] == world.complex_prompt(first["count"], obj.color, obj.shape)
    from PIL import Image

    image = Image.open(out / "adapter_train" / first["file_name"])
    assert shapes.check(image, target=(first["count"], obj.color, obj.shape))["exact"]
    prompts = world.suite(tmp_path / "world", ["held_out_combinations", "held_out_objects"], images_per_combo=3)
    assert {p.category for p in prompts} == {"held_out_combinations", "held_out_objects"}
    assert all(p.complex and p.target for p in prompts)
    assert len(world.suite(tmp_path / "world", "held_out_objects", images_per_combo=3, per_split=5)) == 5
    # Written once: a second call with the same settings reuses the folder.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    world.write_world(tmp_path / "world", seed=0, images_per_combo=3)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # Another split seed gets its own folder and leaves this world's files as they were.
    other = world.write_world(tmp_path / "world", seed=1, images_per_combo=3)
    assert other != out and json.loads((other / "manifest.json").read_text())["settings"]["seed"] == 1
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert world.suite(tmp_path / "world", "held_out_objects", seed=1, images_per_combo=3) != world.suite(
        tmp_path / "world", "held_out_objects", seed=0, images_per_combo=3
    )


# ---------------------------------------------------------------- the shipped base


def test_shipped_base_matches_its_recorded_hashes_and_loads():
    from sur_lightning.models.backbone import StableDiffusionBackbone

    record = verify_base()
    assert record["accuracy"]["color_accuracy"] >= 0.85 and record["accuracy"]["shape_accuracy"] >= 0.70
    assert "python -m sur_lightning.toyworld.pretrain" in record["command"]
    backbone = StableDiffusionBackbone(shipped_base())
    assert backbone.cross_attention_dim == 128
    assert len(backbone.tokenizer) == 49408
    states = backbone.encode_prompt(["two red circles", "a pair of tomatoes"])
    assert states.shape == (2, 77, 128)
    assert backbone.noise_scheduler.config.clip_sample is False


def test_a_damaged_base_file_is_named(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(BASE_DIR, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors has SHA-256"):
        verify_base(copy)
    (copy / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match="base.json"):
        verify_base(copy)


# ---------------------------------------------------------------- pretraining


@pytest.mark.slow
def test_pretraining_runs_resumes_and_exports_a_loadable_base(tmp_path):
    tiny = [
        f"work_dir={tmp_path}/work",
        f"export_dir={tmp_path}/base",
        "vae.steps=2",
        "vae.batch_size=2",
        "vae.model.block_out_channels=[8,8,16]",
        "text_encoder.hidden_size=16",
        "text_encoder.num_heads=2",
        "unet.model.block_out_channels=[8,16]",
        "unet.model.num_heads=2",
        "unet.num_images=8",
        "unet.batch_size=2",
        "unet.warmup=1",
        "eval_every=0",
        "checkpoint_every=1",
        "log_every=1",
        "eval.steps=2",
        "eval.final_seeds=[0]",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    run = [sys.executable, "-m", "sur_lightning.toyworld.pretrain", *tiny]
    subprocess.run([*run, "unet.steps=2"], check=True, capture_output=True, timeout=300)
    # Resume: the same work_dir with more steps continues at step 2, it does not start again.
    subprocess.run([*run, "unet.steps=3"], check=True, capture_output=True, timeout=300)
    log = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    unet_steps = [row["step"] for row in log if row["stage"] == "unet" and "loss" in row]
    assert unet_steps == [1, 2, 3]
    record = verify_base(tmp_path / "base")
    assert set(record["accuracy"]) >= {"count_accuracy", "color_accuracy", "shape_accuracy"}
    assert "unet.steps=3" in record["command"]

    from sur_lightning.models.backbone import StableDiffusionBackbone

    backbone = StableDiffusionBackbone(str(tmp_path / "base"))
    assert backbone.unet.config.cross_attention_dim == 16
    assert backbone.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])


# ---------------------------------------------------------------- the demo and the benchmark table


@pytest.mark.slow
def test_demo_on_the_toy_base_prints_the_table_and_draws_three_columns(tmp_path, cache_dir, tiny_llm, caplog):
    import logging

    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sur_lightning.config import CONFIG_DIR
    from sur_lightning.train import train

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=demo", *toy_demo_overrides(tmp_path, cache_dir)])
    with caplog.at_level(logging.INFO, logger="sur_lightning"):
        metrics = train(cfg)
    out = caplog.text  # the table is logged: Hydra's handlers print it and write it to train.log
    assert "| held_out_combinations | base + simple | 4 |" in out
    assert "| held_out_combinations | base + complex | 4 |" in out
    assert "| held_out_combinations | adapter + simple | 4 |" in out
    assert "eval/base+complex/color_accuracy" in metrics
    # Four images per split are too few to state a gap closed: the table says so, and nothing is logged.
    assert "| held_out_combinations | adapter + simple | 4 |" in out and "– (n=4) / – (n=4) / – (n=4) |" in out
    assert not any(key.startswith("eval/gap_closed/") for key in metrics)
    # The grid: a label column, then base + simple | adapter + simple | base + complex, one row per prompt.
    grid = Image.open(next((tmp_path / "run" / "samples").glob("*.png")))
    assert grid.size == (160 + 3 * 128, 16 + 2 * 128)
    report = json.loads(next((tmp_path / "run" / "evaluation").glob("*.json")).read_text())
    assert set(report["columns"]) == {"base", "base+complex", "adapter"}
    # The run folder keeps the table beside metrics.json: report.md as printed, report.json with every image's row.
    assert "| held_out_objects | adapter + simple | 4 |" in (tmp_path / "run" / "report.md").read_text()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["settings"]["step"] == 2 and len(saved["images"]) == 3 * 2 * 4 and "gap_closed" in saved


def test_gap_closed_on_a_hand_made_report():
    from sur_lightning.evaluation.report import gap_closed, split_scores, toyworld_table

    def rows(column, split, colors):
        return [
            {"column": column, "category": split, "color_accuracy": c, "shape_accuracy": 1.0, "count_accuracy": 0.0}
            for c in colors
        ]

    # Each pattern three times: 12 images per split, enough for a gap to be stated (report.MIN_GAP_N).
    report = {
        "columns": {},
        "images": 3
        * (rows("base", "a", [0, 0, 0, 1]) + rows("base+complex", "a", [1, 1, 1, 1]) + rows("sur", "a", [1, 1, 0, 1])),
    }
    scores = split_scores(report)
    assert scores["sur"]["a"]["color_accuracy"] == 0.75
    assert scores["sur"]["a"]["color_accuracy_ci95"] == pytest.approx(1.96 * (0.75 * 0.25 / 12) ** 0.5)
    closed = gap_closed(report)
    assert closed["sur"]["a"]["color_accuracy"] == pytest.approx((0.75 - 0.25) / (1.0 - 0.25))
    assert closed["sur"]["a"]["shape_accuracy"] is None  # base already at the bound: no gap to close
    table = toyworld_table(report)
    assert "| a | sur + simple | 12 | 0.75 ± 0.24 |" in table and "0.67 / – (no gap) / – (no gap)" in table


def test_suite_rows_with_targets_and_their_errors(tmp_path):
    from sur_lightning.data.prompt_suites import load_jsonl

    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps(
            {
                "prompt": "a pair of limes",
                "complex": "two green circles",
                "count": 2,
                "color": "green",
                "shape": "circle",
            }
        )
        + "\n"
    )
    (prompt,) = load_jsonl(good)
    assert prompt.target == (2, "green", "circle") and prompt.complex == "two green circles"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a lime", "count": 1}) + "\n" + json.dumps({"prompt": "x", "complex": 3}) + "\n"
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a target needs all of count, color, shape(.|\n)*bad.jsonl:2"):
        load_jsonl(bad)


def test_llm_probe_separates_features_that_carry_the_colour():
    from sur_lightning.toyworld.probe import linear_probe

    colors = {obj.name: obj.color for obj in world.OBJECTS}
    palette = sorted(set(colors.values()))
    names = [obj.name for obj in world.OBJECTS for _ in range(3)]
    generator = torch.Generator().manual_seed(0)
    # Features that encode the colour (one-hot plus noise) give a perfect leave-one-object-out probe ...
    informative = torch.stack([torch.eye(len(palette))[palette.index(colors[n])] for n in names])
    informative = informative + 0.05 * torch.randn(informative.shape, generator=generator)
    assert linear_probe(informative, names, colors)["accuracy"] == 1.0
    # ... features that only identify the object cannot name an unseen object's colour.
    identity = torch.randn(len(world.OBJECTS), 16, generator=generator).repeat_interleave(3, dim=0)
    result = linear_probe(identity, names, colors)
    assert result["accuracy"] < 0.5 and result["chance"] == pytest.approx(1 / 6)


def _write(out, seed):
    from sur_lightning.toyworld.world import write_world

    return str(write_world(out, seed=seed, images_per_combo=1))


def test_two_split_seeds_worlds_are_written_at_once_without_clobbering_each_other(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    from sur_lightning.toyworld.world import make_splits

    def lines(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    with ProcessPoolExecutor(2) as pool:
        folders = [Path(f) for f in pool.map(_write, [tmp_path] * 4, [0, 3, 0, 3])]
    assert folders[0] == folders[2] != folders[1] == folders[3]
    for seed, folder in ((0, folders[0]), (3, folders[1])):
        held = {name for name, _ in make_splits(seed).held_out_objects}
        assert {row["object"] for row in lines(folder / "suites" / "held_out_objects.jsonl")} == held
        assert json.loads((folder / "manifest.json").read_text())["settings"]["seed"] == seed
        assert not {row["object"] for row in lines(folder / "adapter_train" / "metadata.jsonl")} & held
