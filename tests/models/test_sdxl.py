"""SDXL backbones: both encoders, the pooled embedding and the size/crop time ids reach the UNet; SUR and ELLA
train on the tiny SDXL with gradients reaching exactly their trainable parameters; the feature cache holds
what SDXL reads; a run resumes; generation goes through diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sur_lightning.models.connectors import TextFeatures


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl):
    from sur_lightning.models.sdxl import StableDiffusionXLBackbone

    return StableDiffusionXLBackbone(tiny_sdxl)


@pytest.fixture
def compose(tmp_path, cache_dir, tiny_sdxl, tiny_llm):
    """compose(*overrides) -> the train config with the shared tiny overrides (minus SUR's connector sizes)."""
    from conftest import CONFIG_DIR, tiny_overrides
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    tiny = [o for o in tiny_overrides(tmp_path, cache_dir) if not o.startswith("connector.")]

    def _compose(*overrides: str, tiny_models: bool = True):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name="train", overrides=[*(tiny if tiny_models else []), *overrides])

    return _compose


def sdxl_overrides(connector: str) -> list[str]:
    common = ["backbone=sdxl_tiny", "callbacks.sample_grid.num_inference_steps=2"]
    if connector == "ella":
        return [*common, "connector=ella_small", "llm.pooling=none", "loss=denoising"]
    return [*common, "connector=sur_small", "connector.ff_dim=32"]


def test_text_features_match_the_stock_sdxl_pipeline(sdxl, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    tokens, pooled = sdxl.encode_text(["two red circles", "a pair of tomatoes"])
    assert tokens.shape == (2, 77, 48) and pooled.shape == (2, 32)
    assert sdxl.cross_attention_dim == 48 and sdxl.pooled_dim == 32
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    embeds, _, pooled_embeds, _ = pipe.encode_prompt(
        ["two red circles", "a pair of tomatoes"], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(tokens, embeds)
    torch.testing.assert_close(pooled, pooled_embeds)
    assert sdxl.vae.config.scaling_factor == pytest.approx(0.13025)


def test_pooled_embedding_and_time_ids_change_the_prediction(sdxl):
    tokens, pooled = sdxl.encode_text(["two red circles"] * 2)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    ids = sdxl.time_ids(torch.tensor([[64, 64], [64, 64]]), torch.tensor([[0, 0], [0, 0]]), (64, 64))
    assert ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    base = sdxl.predict(latents, t, tokens, pooled, ids)
    other_ids = sdxl.time_ids(torch.tensor([[200, 100], [64, 64]]), torch.tensor([[30, 0], [0, 0]]), (64, 64))
    moved = sdxl.predict(latents, t, tokens, pooled, other_ids)
    assert not torch.allclose(moved[0], base[0]) and torch.allclose(moved[1], base[1])
    zero_pooled = sdxl.predict(latents, t, tokens, torch.zeros_like(pooled), ids)
    assert not torch.allclose(zero_pooled, base)
    with pytest.raises(ValueError, match="pooled embedding"):
        sdxl.predict(latents, t, tokens)


def test_preprocessing_records_size_and_crop_like_diffusers_sdxl_script():
    from sur_lightning.data.datasets import preprocess, preprocess_with_geometry

    image = Image.new("RGB", (120, 80))  # width 120, height 80 -> resized to 48 x 32 for resolution 32
    pixels, geometry = preprocess_with_geometry(image, 32, center_crop=True, flip=False)
    assert pixels.shape == (3, 32, 32) and torch.equal(pixels, preprocess(image, 32, True, False))
    assert geometry["original_size"].tolist() == [80, 120] and geometry["crop_top_left"].tolist() == [0, 8]

    class Fixed:
        @staticmethod
        def randint(low, high):
            return high  # the crop at the right edge

    _, flipped = preprocess_with_geometry(image, 32, center_crop=False, flip=True, rng=Fixed)
    # Cropped at left 16 of 48 and mirrored: the same pixels sit at left 0 of the mirrored image.
    assert flipped["crop_top_left"].tolist() == [0, 0]


@pytest.mark.parametrize("connector", ["sur", "ella"])
def test_each_connector_trains_on_sdxl_with_gradients_to_exactly_its_parameters(compose, connector):
    from hydra.utils import instantiate

    from sur_lightning.config import datamodule_arguments

    cfg = compose(*sdxl_overrides(connector))
    module = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["original_size"].shape == (2, 2) and batch["crop_top_left"].shape == (2, 2)

    seen = {}
    unet_forward = module.backbone.unet.forward

    def spy(*args, **kwargs):
        seen.update(kwargs["added_cond_kwargs"])
        return unet_forward(*args, **kwargs)

    module.backbone.unet.forward = spy
    masks = []
    connector_forward = module.connector.forward
    module.connector.forward = lambda features, t: masks.append(features.llm_mask) or connector_forward(features, t)
    loss = module.training_forward(batch)
    if connector == "ella":  # the LLM's attention mask reaches the TSC
        assert masks[0] is not None and masks[0].dtype == torch.bool and masks[0].shape[0] == 2
    loss.backward()
    assert seen["text_embeds"].shape == (2, 32) and seen["time_ids"].shape == (2, 6)
    target = module.backbone.batch_time_ids(batch, torch.zeros(2, 4, 16, 16))
    torch.testing.assert_close(seen["time_ids"], target)

    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert trainable and all(name.startswith("connector.") for name in trainable)
    frozen_with_grad = with_grad - trainable
    assert not frozen_with_grad
    # Every trainable parameter receives a gradient: with SUR's zero-initialised output layers, a part of the
    # adapter only gets one after the first step, so compare with the parameters the output depends on now.
    if connector == "ella":
        assert with_grad == trainable
    else:
        assert {"connector.fc.weight", "connector.pooled_head.weight", "connector.pooled_head.bias"} <= with_grad


def test_sur_adapts_the_pooled_embedding_from_zero_and_aligns_it(sdxl):
    from sur_lightning.models.connectors.sur import SURAdapter
    from sur_lightning.models.eta import FixedEta

    tokens, pooled = sdxl.encode_text(["two red circles"])
    adapter = SURAdapter(dim=48, llm_dim=16, eta=FixedEta(0.5), num_heads=4, ff_dim=32, pooled_dim=32)
    out = adapter(TextFeatures(clip=tokens, pooled=pooled))
    torch.testing.assert_close(out.pooled, pooled)  # the correction starts at zero
    assert adapter.adapts_pooled
    keep = SURAdapter(dim=48, llm_dim=16, eta=FixedEta(0.5), num_heads=4, ff_dim=32, pooled_dim=32, pooled="clip")
    assert keep.pooled_head is None and not keep.adapts_pooled
    assert keep(TextFeatures(clip=tokens, pooled=pooled)).pooled is pooled


def test_ella_pooled_modes(sdxl):
    from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector

    _, pooled = sdxl.encode_text(["two red circles"])
    states = torch.randn(1, 5, 16)
    t = torch.tensor([10])
    clip_mode = TimestepAwareSemanticConnector(
        dim=48, llm_dim=16, num_blocks=1, num_heads=4, num_latents=8, time_embed_dim=32, pooled_dim=32
    )
    out = clip_mode(TextFeatures(llm=states, pooled=pooled), t)
    assert out.conditioning.shape == (1, 8, 48) and out.pooled is pooled and not clip_mode.adapts_pooled
    learned = TimestepAwareSemanticConnector(
        dim=48, llm_dim=16, num_blocks=1, num_heads=4, num_latents=8, time_embed_dim=32, pooled_dim=32, pooled="learned"
    )
    out = learned(TextFeatures(llm=states, pooled=pooled), t)
    assert out.pooled.shape == (1, 32) and not torch.allclose(out.pooled, pooled) and learned.adapts_pooled
    with pytest.raises(ValueError, match="'clip' or 'learned'"):
        TimestepAwareSemanticConnector(dim=48, llm_dim=16, pooled="adapted")


def test_feature_cache_stores_pooled_embeddings_and_image_geometry(compose):
    from conftest import open_cache
    from hydra.utils import instantiate

    from sur_lightning.config import datamodule_arguments
    from sur_lightning.training.feature_cache import build_cache, extra_prompts

    cfg = compose(*sdxl_overrides("sur"), "data.cache=auto")
    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    cache = open_cache(cfg)
    backbone = build_cache(datamodule, cache, extra_prompts(cfg.get("callbacks")))
    assert cache.clip.names == ("states", "pooled")
    assert cache.latents.names == ("mean", "logvar", "original_size", "crop_top_left")
    features = cache.text_features(["two red circles", ""])
    tokens, pooled = backbone.encode_text(["two red circles", ""])
    torch.testing.assert_close(features.clip, tokens)
    torch.testing.assert_close(features.pooled, pooled)
    datamodule.use_latent_store(cache.latents)
    batch = next(iter(datamodule.train_dataloader()))
    assert "latent_mean" in batch and batch["original_size"].tolist() == [[64, 64], [64, 64]]
    assert batch["crop_top_left"].tolist() == [[0, 0], [0, 0]]


@pytest.mark.slow
def test_sdxl_training_from_the_cache_resumes_and_generates(compose):
    from sur_lightning.train import train

    common = (
        *sdxl_overrides("sur"),
        "data.cache=auto",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    first = compose(*common, "trainer.max_steps=2")
    train(first)
    out = Path(first.paths.output_dir)
    assert (out / "adapter.safetensors").exists() and list((out / "samples").glob("*.png"))
    resumed = compose(*common, "trainer.max_steps=4", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}")
    train(resumed)
    assert json.loads((Path(resumed.paths.output_dir) / "metrics.json").read_text())["global_step"] == 4


def test_generation_renders_through_the_sdxl_pipeline_with_the_connector(sdxl):
    from sur_lightning.generation.conditioning import ClipConditioning, ConnectorConditioning, frozen_text_features
    from sur_lightning.generation.pipeline import build_pipeline, render
    from sur_lightning.models.connectors.sur import SURAdapter
    from sur_lightning.models.eta import FixedEta

    pipeline = build_pipeline(sdxl)
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"
    adapter = SURAdapter(dim=48, llm_dim=16, eta=FixedEta(1.0), num_heads=4, ff_dim=32, pooled_dim=32).eval()
    text = frozen_text_features(sdxl)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0}
    base = render(pipeline, ClipConditioning(text), ["two red circles"], [0], **kwargs)
    same = render(pipeline, ConnectorConditioning(adapter, text), ["two red circles"], [0], **kwargs)
    assert base[0].size == (64, 64)
    # η = 1 with zero-initialised output layers: tokens are fc(o) = its bias, the pooled embedding is CLIP's.
    torch.nn.init.normal_(adapter.pooled_head.weight, std=5.0)
    moved = render(pipeline, ConnectorConditioning(adapter, text), ["two red circles"], [0], **kwargs)
    import numpy as np

    assert not np.array_equal(np.asarray(same[0]), np.asarray(moved[0]))
    assert not np.array_equal(np.asarray(base[0]), np.asarray(same[0]))


@pytest.mark.parametrize("preset", ["sur_sdxl", "ella_sdxl"])
def test_sdxl_presets_compose_with_the_fields_1024px_settings(compose, preset):
    cfg = compose(f"+experiment={preset}", tiny_models=False)
    assert cfg.backbone._target_ == "sur_lightning.models.sdxl.StableDiffusionXLBackbone"
    assert cfg.backbone.pretrained == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.backbone.gradient_checkpointing
    assert cfg.data.resolution == 1024 and cfg.data.center_crop and cfg.data.random_flip and cfg.data.batch_size == 1
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accumulate_grad_batches == 4
    assert cfg.connector.pooled == ("adapted" if preset == "sur_sdxl" else "clip")


@pytest.mark.parametrize("preset", ["sur_sdxl", "ella_sdxl"])
def test_sdxl_presets_train_on_the_tiny_sdxl(compose, preset):
    from sur_lightning.train import train

    small = (
        ["connector.num_heads=4", "connector.ff_dim=32"]
        if preset == "sur_sdxl"
        else [
            "connector.num_blocks=1",
            "connector.num_heads=4",
            "connector.time_embed_dim=32",
            "connector.time_channels=32",
        ]
    )
    # The preset's own settings (bf16-mixed, checkpointing, caption dropout, the cache) on tiny models and data.
    cfg = compose(
        f"+experiment={preset}",
        "backbone=sdxl_tiny",
        "llm=tiny",
        "data=synthetic",
        "data.resolution=64",
        "data.root.num_images=6",
        "data.val_size=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "callbacks.sample_grid.num_inference_steps=2",
        "callbacks.sample_grid.prompts=[two red circles]",
        "callbacks.sample_grid.seeds=[0]",
        "backbone.gradient_checkpointing=true",
        *small,
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["global_step"] == 2


def test_bench_measures_the_floor_on_sdxl(tmp_path, cache_dir, tiny_sdxl, tiny_llm):
    from conftest import CONFIG_DIR, tiny_overrides
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sur_lightning.bench import run

    overrides = [
        o
        for o in tiny_overrides(tmp_path, cache_dir)
        if not o.startswith(("callbacks.", "data.val_size", "connector."))
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(
            config_name="bench",
            overrides=[
                *overrides,
                "backbone=sdxl_tiny",
                "connector=sur_small",
                "connector.ff_dim=32",
                "bench.steps=1",
                "bench.warmup=1",
                "bench.inference_steps=2",
                "bench.inference_repeats=1",
                "bench.cache_off=false",
            ],
        )
    result = run(cfg)
    assert result["floor_s"] > 0 and result["warm_cache_ratio_to_floor"] > 0 and result["inference"]["ratio"] > 0
