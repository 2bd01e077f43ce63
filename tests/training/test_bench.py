"""The benchmark runs on the tiny backbone and reports every figure it promises (values are measured, not asserted)."""

from hydra import compose, initialize_config_dir

from sur_lightning.bench import run
from sur_lightning.config import CONFIG_DIR
from sur_lightning.training.benchmark import table


def test_bench_reports_floor_phases_cache_and_inference(tmp_path, cache_dir, tiny_sd, tiny_llm):
    from conftest import tiny_overrides

    overrides = [o for o in tiny_overrides(tmp_path, cache_dir) if not o.startswith(("callbacks.", "data.val_size"))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="bench",
            overrides=[
                *overrides,
                "bench.steps=2",
                "bench.warmup=1",
                "bench.inference_steps=2",
                "bench.inference_repeats=1",
                "bench.ratio_rounds=3",
                "bench.round_steps=1",
            ],
        )
    result = run(cfg)
    rounds = result["floor_ratio"]
    assert len(rounds["ratios"]) == 3 and rounds["ratio_min"] <= rounds["ratio_median"] <= rounds["ratio_max"]
    assert result["warm_cache_ratio_to_floor"] == rounds["ratio_median"]
    phases = ("data", "connector", "unet_forward", "other_forward", "backward", "optimizer")
    for key in ("warm_cache", "cache_off"):
        assert all(result[key][p] >= 0 for p in phases)
        assert abs(result[key]["step"] - sum(result[key][p] for p in phases)) < 1e-9
    assert result["floor_s"] > 0 and result["warm_cache_ratio_to_floor"] > 0 and result["cache_speedup"] > 0
    assert abs(result["warm_cache_ratio_to_cache_off"] * result["cache_speedup"] - 1) < 1e-9
    assert "memory_growth_mb_over_steps" in result
    assert result["inference"]["base"] > 0 and result["inference"]["ratio"] > 0
    # SUR ignores the timestep: generation runs it once for the prompt and once for the negative, not per step.
    assert 0 < result["inference"]["connector_calls_s"] < result["inference"]["connector"]
    assert result["machine"]["torch"] and result["config"]["batch_size"] == 2
    text = table(result)
    assert "warm step / floor" in text and "pipeline, one prompt" in text and "growth over the 2 timed steps" in text


def test_bench_with_no_training_steps_measures_generation_only(tmp_path, cache_dir, tiny_sd, tiny_llm):
    import pytest
    from conftest import tiny_overrides

    overrides = [o for o in tiny_overrides(tmp_path, cache_dir) if not o.startswith(("callbacks.", "data.val_size"))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="bench",
            overrides=[*overrides, "bench.steps=0", "bench.inference_steps=2", "bench.inference_repeats=1"],
        )
        nothing = compose(config_name="bench", overrides=[*overrides, "bench.steps=0", "bench.inference_steps=0"])
    result = run(cfg)
    assert "warm_cache" not in result and "floor_s" not in result and result["inference"]["base"] > 0
    assert "pipeline, one prompt" in table(result) and "warm step" not in table(result)
    with pytest.raises(ValueError, match="leave nothing to measure"):
        run(nothing)


def test_bench_memory_growth_sees_a_step_that_keeps_what_it_allocates(
    tmp_path, cache_dir, tiny_sd, tiny_llm, monkeypatch
):
    """A leak of 32 MB per step shows as ~64 MB over 2 timed steps; the current RSS, not the peak, is what is read."""
    import torch
    from conftest import tiny_overrides

    from sur_lightning.bench import training_step_time_of
    from sur_lightning.training.module import ConnectorTrainingModule

    kept = []
    real_step = ConnectorTrainingModule.training_step

    def leaky_step(self, batch, batch_idx):
        # 64 MB, written so its pages are resident. Above glibc's largest mmap threshold (32 MB), so the block is
        # always fresh pages: a smaller one can reuse memory that earlier tests freed, which RSS already counts.
        kept.append(torch.ones(16 * 2**20))
        return real_step(self, batch, batch_idx)

    overrides = [o for o in tiny_overrides(tmp_path, cache_dir) if not o.startswith(("callbacks.", "data.val_size"))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    plain = training_step_time_of(cfg, "auto", torch.device("cpu"), steps=2, warmup=1)
    monkeypatch.setattr(ConnectorTrainingModule, "training_step", leaky_step)
    leaky = training_step_time_of(cfg, "auto", torch.device("cpu"), steps=2, warmup=1)
    assert len(kept) == 3
    assert leaky["memory_growth_mb"] > 112 and leaky["memory_growth_mb"] > plain["memory_growth_mb"] + 96


def test_random_backbones_of_real_proportions_load_like_the_hub_model(tmp_path):
    import pytest

    from sur_lightning.models.backbone import StableDiffusionBackbone
    from sur_lightning.models.random_models import build_random_stable_diffusion

    folder = build_random_stable_diffusion(tmp_path / "mid", shape="mid", sample_size=8)
    assert sorted(p.name for p in (tmp_path / "mid").iterdir() if p.is_dir() and not p.name.startswith("_")) == [
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    backbone = StableDiffusionBackbone(folder)
    assert tuple(backbone.unet.config.block_out_channels) == (64, 128, 256)
    assert backbone.cross_attention_dim == 256 == backbone.text_encoder.config.hidden_size
    assert build_random_stable_diffusion(tmp_path / "mid", shape="mid", sample_size=8) == folder  # built once
    with pytest.raises(ValueError, match="shape must be one of"):
        build_random_stable_diffusion(tmp_path / "x", shape="sdxl")


def test_unet_speed_options_keep_the_prediction_and_its_gradient(tiny_sd, monkeypatch):
    import torch
    from diffusers import UNet2DConditionModel

    from sur_lightning.models.backbone import StableDiffusionBackbone

    def step(backbone):
        torch.manual_seed(0)
        latents, conditioning = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32, requires_grad=True)
        prediction = backbone.predict(latents, torch.tensor([10, 500]), conditioning)
        prediction.square().mean().backward()
        return prediction.detach(), conditioning.grad

    plain = step(StableDiffusionBackbone(tiny_sd))
    options = StableDiffusionBackbone(tiny_sd, channels_last=True, gradient_checkpointing=True)
    assert options.unet.is_gradient_checkpointing
    assert options.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast = step(options)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-6)

    compiled = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", lambda self, *a, **k: compiled.append(self))
    backbone = StableDiffusionBackbone(tiny_sd, compile_unet=True)
    assert compiled == [backbone.unet]


def test_bench_applies_the_trainers_precision_as_lightning_does():
    import pytest
    import torch

    from sur_lightning.training.benchmark import autocast

    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    with autocast("bf16-mixed", cpu):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("32-true", cpu):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="trainer.precision=64-true"):
        autocast("64-true", cpu)


def test_a_floor_ratio_below_one_is_flagged_as_noise_not_reported():
    rounds = {
        "rounds": 5,
        "ratios": [0.9, 0.94, 0.95, 1.0, 1.02],
        "ratio_median": 0.95,
        "ratio_min": 0.9,
        "ratio_max": 1.02,
        "below_one": True,
    }
    result = {
        "warm_cache": dict.fromkeys(
            ("data", "connector", "unet_forward", "other_forward", "backward", "optimizer", "step"), 0.1
        ),
        "floor_s": 0.105,
        "warm_cache_ratio_to_floor": 0.95,
        "floor_ratio": rounds,
        "peak_rss_mb": 1.0,
        "config": {"steps": 2},
        "machine": {"cpu": "x", "threads": 2, "gpu": None, "torch": "t", "diffusers": "d", "lightning": "l"},
    }
    text = table(result)
    assert "median of 5 alternating rounds; range 0.90–1.02" in text and "BELOW 1" in text
    assert "BELOW 1" not in table({**result, "floor_ratio": {**rounds, "ratio_median": 1.1, "below_one": False}})
