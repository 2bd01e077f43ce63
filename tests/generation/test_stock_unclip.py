"""+experiment=unclip_sd21_clip gives diffusers' stock StableUnCLIPPipeline its prior: the prior reads the text the
pipeline feeds its prior, its export's ``prior_transformer/`` predicts what the trained DiffusionPrior predicts from
the pipeline's own prior inputs (padded prompts included), and the pipeline draws with it, its prior stage giving
the framework's own sampler's embeddings for the same seed. All tiny and random, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR
from diffusers import PriorTransformer, StableUnCLIPPipeline
from hydra import compose, initialize_config_dir

from sur_lightning.generation.unclip import STOCK_PRIOR, load_prior, stock_unclip_pipeline
from sur_lightning.models.prior_text import StableUnclipPriorText

# Two prompts of different lengths: both padded to 77 tokens, the first much more.
PROMPTS = ["one red circle", "three small blue squares beside two big green triangles on a wooden table"]
EMBEDDING_DIM = 32  # the tiny prior text encoder's width and projection, and the tiny vision tower's projection


@pytest.fixture(scope="module")
def stock_pipeline(cache_dir) -> str:
    from sur_lightning.models.random_models import build_tiny_stable_unclip

    return build_tiny_stable_unclip(cache_dir / "tiny-stable-unclip", embedding_dim=EMBEDDING_DIM)


@pytest.fixture(scope="module")
def export(tmp_path_factory, cache_dir, stock_pipeline) -> Path:
    """The prior export of 2 training steps of +experiment=unclip_sd21_clip through the real entry point, on tiny
    random parts: the stock pipeline's prior text, a CLIP vision tower of the same width, the tiny backbone."""
    from sur_lightning.models.random_models import build_tiny_clip_vision
    from sur_lightning.train import train

    vision = build_tiny_clip_vision(cache_dir / "tiny-clip-vision-32", projection_dim=EMBEDDING_DIM)
    root = tmp_path_factory.mktemp("unclip_sd21_clip")
    overrides = [
        "+experiment=unclip_sd21_clip",
        "backbone=tiny",
        "data=synthetic",
        "trainer=cpu",
        "logger=csv",
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={root}/run",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.root.num_images=8",
        "data.val_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "threads=1",
        f"model.text_encoder.pipeline={stock_pipeline}",
        f"model.image_tower.folder={vision}",
        "model.prior.num_layers=1",
        "model.prior.num_attention_heads=2",
        "model.prior.attention_head_dim=8",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)

    def no_backbone(*args, **kwargs):
        raise AssertionError("train() built the backbone, which this prior never reads")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sur_lightning.models.backbone.StableDiffusionBackbone.__init__", no_backbone)
        metrics = train(cfg)
    assert "train/loss" in metrics and "val/prior" in metrics
    return root / "run" / "unclip"


def test_the_preset_reads_the_pipelines_prior_text_instead_of_an_llm(compose):
    cfg = compose("+experiment=unclip_sd21_clip", tiny=False)
    assert cfg.llm is None and cfg.model._target_.endswith("UnclipPriorModule")
    assert cfg.model.text_encoder._target_.endswith("StableUnclipPriorText")
    assert cfg.model.text_encoder.pipeline == "stabilityai/stable-diffusion-2-1-unclip-small"
    assert cfg.model.image_tower.folder == "openai/clip-vit-large-patch14" and cfg.model.prior.num_embeddings == 77
    assert cfg.task_name == "unclip_sd21_clip" and cfg.callbacks.export.filename == "unclip"


def test_the_prior_text_is_what_the_stock_pipeline_feeds_its_prior(stock_pipeline):
    source = StableUnclipPriorText(stock_pipeline)
    pipe = StableUnCLIPPipeline.from_pretrained(stock_pipeline)
    states, mask, pooled = source(PROMPTS)
    pooled_stock, states_stock, mask_stock = pipe._encode_prior_prompt(PROMPTS, torch.device("cpu"), 1, False)
    assert states.shape == (2, 77, EMBEDDING_DIM) and pooled.shape == (2, EMBEDDING_DIM)
    assert torch.equal(states, states_stock) and torch.equal(mask, mask_stock) and torch.equal(pooled, pooled_stock)
    assert 0 < int(mask[0].sum()) < int(mask[1].sum()) < 77  # both padded, by different amounts
    assert (source.hidden_size, source.pooled_dim, source.max_length) == (EMBEDDING_DIM, EMBEDDING_DIM, 77)
    assert not any(p.requires_grad for p in source.parameters())


def test_the_exported_prior_transformer_predicts_what_the_prior_predicts(export, stock_pipeline):
    record = json.loads((export / "unclip.json").read_text())
    assert record["prior_transformer"] == {"folder": STOCK_PRIOR, "pipeline": stock_pipeline}
    assert record["text"]["pipeline"] == stock_pipeline and record["trained_with"]["llm"] is None
    prior, _ = load_prior(export)
    stock = PriorTransformer.from_pretrained(str(export / STOCK_PRIOR)).eval()
    assert type(stock) is PriorTransformer and stock.config.num_embeddings == 77
    assert torch.equal(stock.clip_mean, prior.transformer.clip_mean) and bool((stock.clip_std > 0).all())

    # The pipeline's own prior inputs, with classifier-free guidance: the empty prompt's rows first.
    pipe = StableUnCLIPPipeline.from_pretrained(stock_pipeline)
    pooled, states, mask = pipe._encode_prior_prompt(PROMPTS, torch.device("cpu"), 1, True)
    assert len(pooled) == 4 and bool((~mask).any(dim=1).all())  # every row padded
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(4, EMBEDDING_DIM, generator=generator)
    timesteps = torch.tensor([999, 500, 20, 0])
    with torch.no_grad():
        expected = prior(noisy, timesteps, states, mask, pooled)
        got = stock(
            noisy, timesteps, proj_embedding=pooled, encoder_hidden_states=states, attention_mask=mask
        ).predicted_image_embedding
        # The pipeline passes one scalar timestep per step.
        scalar = stock(
            noisy, timesteps[1], proj_embedding=pooled, encoder_hidden_states=states, attention_mask=mask
        ).predicted_image_embedding
        at_500 = prior(noisy, torch.full((4,), 500), states, mask, pooled)
    # Not bitwise: W2 (W1 x + b1) + b2 and (W2 W1) x + (W2 b1 + b2) round differently in float32.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scalar, at_500, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, at_500)


def test_padded_positions_never_reach_the_prediction(export, stock_pipeline):
    """DiffusionPrior zeroes the padded positions' states; the pipeline passes CLIP's states there (not zero). Under
    the attention mask neither matters: any values at the padded positions give the very same prediction."""
    stock = PriorTransformer.from_pretrained(str(export / STOCK_PRIOR)).eval()
    pipe = StableUnCLIPPipeline.from_pretrained(stock_pipeline)
    pooled, states, mask = pipe._encode_prior_prompt(PROMPTS, torch.device("cpu"), 1, True)
    assert float(states[~mask].abs().sum()) > 0  # CLIP's states at the padding are not zero
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(4, EMBEDDING_DIM, generator=generator)
    zeroed = states * mask[..., None]
    noised = torch.where(mask[..., None], states, 10 * torch.randn(states.shape, generator=generator))
    real = states.clone()
    real[:, 1] += 1.0  # a real token of every row (after the start token)
    assert bool(mask[:, 1].all())

    def predict(hidden):
        with torch.no_grad():
            return stock(
                noisy, 300, proj_embedding=pooled, encoder_hidden_states=hidden, attention_mask=mask
            ).predicted_image_embedding

    reference = predict(states)
    assert torch.equal(predict(zeroed), reference) and torch.equal(predict(noised), reference)
    assert not torch.allclose(predict(real), reference)  # the check can fail: a real token does count


def test_the_stock_pipeline_draws_with_the_trained_prior_and_its_prior_stage_is_the_frameworks_sampler(
    export, stock_pipeline
):
    pipe = stock_unclip_pipeline(None, export)  # the pipeline the export read its text from
    prior, _ = load_prior(export)
    assert isinstance(pipe, StableUnCLIPPipeline) and pipe.prior.config.embedding_dim == EMBEDDING_DIM
    pipe.set_progress_bar_config(disable=True)

    embeds, largest = [], []
    noise_image_embeddings = pipe.noise_image_embeddings

    def record_embeds(image_embeds, **kwargs):  # the prior stage's output, as the decoder stage receives it
        embeds.append(image_embeds.clone())
        return noise_image_embeddings(image_embeds=image_embeds, **kwargs)

    pipe.noise_image_embeddings = record_embeds
    pipe.prior.register_forward_hook(lambda m, a, out: largest.append(float(out.predicted_image_embedding.abs().max())))
    images = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=2,
        prior_num_inference_steps=2,
        prior_guidance_scale=4.0,
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())

    source = StableUnclipPriorText(stock_pipeline)
    expected = prior.sample(
        *source(PROMPTS), generator=3, num_inference_steps=2, guidance_scale=4.0, negative=source([""])
    )
    # The two samplers are one DDPM chain: the same squared-cosine schedule, x_0 prediction, fixed_small_log variance,
    # initial noise and step noise from one generator, guidance as uncond + s * (cond - uncond), and
    # x * clip_std + clip_mean at the end. The stock prior_scheduler also clips x_0 to ±5 (clip_sample_range=5.0)
    # where PRIOR_SCHEDULER does not clip; no prediction here reaches 5, so the clip does nothing and the chains agree.
    assert len(largest) == 2 and max(largest) < 5.0
    torch.testing.assert_close(embeds[0], expected, atol=1e-5, rtol=1e-4)
    other_seed = prior.sample(
        *source(PROMPTS), generator=4, num_inference_steps=2, guidance_scale=4.0, negative=source([""])
    )
    assert not torch.allclose(embeds[0], other_seed, atol=1e-3)


def test_generate_draws_a_stock_unclip_column(export, tmp_path, cache_dir):
    from sur_lightning.generate import generate

    overrides = [
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path}/run",
        f"unclip={export}",
        "include_base=false",
        "prompts=[one red circle]",
        "seeds=[0,1]",
        "sampler.num_inference_steps=2",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="generate", overrides=overrides)
    generate(cfg, overrides=overrides)
    run = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (run / "images" / "unclip").iterdir()) == [
        "prompt-000_seed0.png",
        "prompt-000_seed1.png",
    ]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["columns"]["unclip"]["kind"] == "unclip_stock"


def test_a_prior_whose_widths_differ_exports_no_prior_transformer_and_says_why(stock_pipeline, tmp_path):
    """The pipeline's 32-wide prior text into a 16-wide image embedding: text_proj cannot be folded in."""
    import functools

    from sur_lightning.models.image_tower import ImageTower
    from sur_lightning.models.prior import DiffusionPrior
    from sur_lightning.training.unclip_module import UnclipPriorModule

    torch.manual_seed(0)
    module = UnclipPriorModule(
        None,  # the backbone: this text source reads nothing of it
        ImageTower(channels=(8, 8, 8, 8), embedding_dim=16, groups=4),
        functools.partial(DiffusionPrior, num_layers=1, num_attention_heads=2, attention_head_dim=8),
        functools.partial(torch.optim.AdamW, lr=1e-3),
        text_encoder=StableUnclipPriorText(stock_pipeline),
    )
    assert (module.prior.config.text_dim, module.prior.config.pooled_dim) == (EMBEDDING_DIM, EMBEDDING_DIM)
    (tmp_path / "unclip" / STOCK_PRIOR).mkdir(parents=True)  # left by an earlier export into this folder
    module.export_pretrained(tmp_path / "unclip")
    record = json.loads((tmp_path / "unclip" / "unclip.json").read_text())
    assert record["prior_transformer"]["folder"] is None and "32 wide" in record["prior_transformer"]["skipped"]
    assert not (tmp_path / "unclip" / STOCK_PRIOR).exists()
    with pytest.raises(ValueError, match="holds no prior_transformer/.*32 wide"):
        stock_unclip_pipeline(stock_pipeline, tmp_path / "unclip")
