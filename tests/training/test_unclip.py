"""unCLIP's two trained stages (issue 34): the decoder's projection is what trains (the UNet stays frozen), the prior's
loss falls, the presets compose and train through the real entry point, and prior -> decoder renders as a column."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from sur_lightning.models.image_tower import ImageTower
from sur_lightning.models.prior import DiffusionPrior
from sur_lightning.models.unclip_decoder import ImageEmbeddingProjection, added_time_embedding
from sur_lightning.training.losses import DenoisingLoss
from sur_lightning.training.unclip_module import UnclipDecoderModule

TOWER = {"channels": (8, 8, 8, 8), "embedding_dim": 16, "groups": 4}


def tiny_tower(seed: int = 0) -> ImageTower:
    torch.manual_seed(seed)
    return ImageTower(**TOWER)


def decoder_module(backbone, dropout: float = 0.0) -> UnclipDecoderModule:
    return UnclipDecoderModule(
        backbone,
        tiny_tower(),
        functools.partial(ImageEmbeddingProjection, num_tokens=2, hidden_dim=16),
        DenoisingLoss(),
        functools.partial(torch.optim.AdamW, lr=1e-3),
        embedding_dropout=dropout,
    )


def latent_batch(backbone, ids, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    size = backbone.unet.config.sample_size
    shape = (len(ids), backbone.unet.config.in_channels, size, size)
    return {"latent_mean": torch.randn(shape, generator=generator), "latent_logvar": torch.full(shape, -6.0), "id": ids}


def test_the_decoder_trains_its_projection_and_leaves_the_unet_frozen(backbone):
    module = decoder_module(backbone)
    ids = ["a", "b", "c"]
    module.embeddings = {i: torch.nn.functional.normalize(torch.randn(16), dim=0) for i in ids}
    loss = module.training_step(latent_batch(backbone, ids), 0)
    loss.backward()
    projection = dict(module.projection.named_parameters())
    # Every projection weight gets a gradient, the zero-initialised time projection included.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection.values()), [
        n for n, p in projection.items() if p.grad is None or p.grad.abs().sum() == 0
    ]
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is None for p in module.tower.parameters())
    trained = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.projection.parameters()}
    assert set(module.state_dict()) and all(k.startswith("projection.") for k in _saved(module))


def _saved(module) -> list[str]:
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return list(checkpoint["state_dict"])


def test_the_embedding_reaches_the_unet_through_tokens_and_time_and_zero_is_the_null(backbone):
    module = decoder_module(backbone)
    with torch.no_grad():  # a time projection that is not zero yet, as after training
        module.projection.to_time.weight.normal_()
    batch = latent_batch(backbone, ["a", "b"])
    noisy, t = batch["latent_mean"], torch.tensor([500, 500])
    embeds = torch.randn(2, 16)
    with torch.no_grad():
        conditioned = module.predict(noisy, t, embeds)
        other = module.predict(noisy, t, embeds.flip(0))
        offset = module.projection(embeds)[1]
        tokens = module.projection(embeds)[0]
        plain = backbone.predict(noisy, t, tokens)
        with added_time_embedding(backbone.unet, offset):
            hooked = backbone.predict(noisy, t, tokens)
    assert not torch.allclose(conditioned, other)
    assert torch.allclose(hooked, conditioned) and not torch.allclose(plain, conditioned)
    # The hook is gone after the block.
    assert torch.allclose(backbone.predict(noisy, t, tokens), plain)


def test_the_prior_training_step_lowers_its_loss(tiny_llm, backbone):
    from sur_lightning.models.llm import CausalLMFeatures
    from sur_lightning.training.unclip_module import UnclipPriorModule

    llm = CausalLMFeatures(tiny_llm, pooling="none")
    module = UnclipPriorModule(
        backbone,
        tiny_tower(),
        functools.partial(DiffusionPrior, num_embeddings=16, num_layers=2, num_attention_heads=2, attention_head_dim=8),
        functools.partial(torch.optim.AdamW, lr=3e-3),
        caption_dropout=0.0,
        llm=llm,
    )
    prompts = ["two red circles", "one blue square", "three green triangles", "a single yellow circle"]
    ids = [f"row{i}" for i in range(4)]
    torch.manual_seed(0)
    module.embeddings = {i: torch.nn.functional.normalize(torch.randn(16), dim=0) for i in ids}
    module.prior.fit_embedding_stats(torch.stack(list(module.embeddings.values())))
    batch = {"simple_prompt": prompts, "id": ids}

    def fixed_loss() -> float:
        with torch.no_grad():
            states, mask, pooled = module.text(prompts)
            return float(
                module.prior.training_loss(
                    module.image_embeddings(ids), states, mask, pooled, generator=torch.Generator().manual_seed(0)
                )
            )

    optimizer = module.configure_optimizers()
    before = fixed_loss()
    for _ in range(30):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * before
    assert all(p.grad is None for p in llm.parameters()) and all(p.grad is None for p in backbone.parameters())
    assert not module.prior.transformer.clip_std.requires_grad


def test_a_render_column_draws_one_image_per_prompt_and_seed_deterministically(backbone):
    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.generation.columns import Column
    from sur_lightning.generation.pipeline import render_columns
    from sur_lightning.generation.unclip import DecoderRender

    torch.manual_seed(0)
    projection = ImageEmbeddingProjection(
        16, **ImageEmbeddingProjection.widths_of(backbone.unet), num_tokens=2, hidden_dim=8
    )
    table = {"a": torch.randn(16), "b": torch.randn(16), "c": torch.randn(16)}
    column = Column(
        "unclip",
        None,
        {"kind": "unclip"},
        render=DecoderRender(backbone, projection, lambda prompts, seeds: torch.stack([table[p] for p in prompts])),
    )
    prompts = [Prompt(id=p, prompt=p, category="test") for p in table]
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, "batch_size": 4, "progress": False}
    rendered = render_columns(backbone, [column], prompts, [0, 1], **kwargs)
    assert [(r.prompt.prompt, r.seed) for r in rendered] == [(p, s) for p in table for s in (0, 1)]
    size = backbone.unet.config.sample_size * 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    assert all(r.image.size == (size, size) for r in rendered)
    again = render_columns(backbone, [column], prompts, [0, 1], **kwargs)
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(rendered, again))


def test_the_prior_samples_one_chain_per_prompt_and_seed():
    from sur_lightning.generation.unclip import PriorEmbeddings
    from sur_lightning.models.connectors import TextFeatures

    torch.manual_seed(0)
    prior = DiffusionPrior(
        text_dim=6,
        pooled_dim=4,
        embedding_dim=8,
        num_embeddings=5,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
    )
    prior.fit_embedding_stats(torch.randn(10, 8))

    class Backbone:  # the pooled state is read at the highest token id; here the first token
        def tokenize(self, prompts):
            return torch.tensor([[9, 1, 1]] * len(prompts))

    def text_features(prompts):
        states = torch.stack([torch.full((3, 6), float(len(p))) for p in prompts])
        return TextFeatures(
            clip=torch.stack([torch.full((3, 4), float(len(p))) for p in prompts]),
            llm=states,
            llm_mask=torch.ones(len(prompts), 3, dtype=torch.bool),
        )

    embed = PriorEmbeddings(Backbone(), prior, text_features, num_inference_steps=3)
    together = embed(["ab", "abcd", "ab"], [0, 0, 1])
    assert torch.equal(together[:1], embed(["ab"], [0]))  # the same whatever shares the batch
    assert not torch.equal(together[0], together[2])  # another seed, another embedding


@pytest.mark.parametrize(
    "experiment, target",
    [
        ("unclip_decoder_toy", "UnclipDecoderModule"),
        ("unclip_toy", "UnclipPriorModule"),
    ],
)
def test_the_unclip_presets_compose(compose, experiment, target):
    cfg = compose(f"+experiment={experiment}", tiny=False)
    assert cfg.model._target_.endswith(target) and cfg.connector is None
    assert cfg.callbacks.export._target_.endswith("ModelExport")
    if experiment == "unclip_toy":
        assert cfg.llm.pooling == "none" and cfg.model.decoder._target_.endswith("newest_decoder")


def unclip_overrides(tmp_path: Path, cache_dir: Path) -> list[str]:
    return [
        "backbone=tiny",
        "data=synthetic",
        "trainer=cpu",
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.root.num_images=12",
        "data.val_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "threads=1",
    ]


def test_decoder_then_prior_train_through_the_entry_point_and_export(compose, tmp_path, cache_dir):
    from sur_lightning.generation.unclip import load_decoder, load_prior
    from sur_lightning.train import train

    decoder_cfg = compose(
        "+experiment=unclip_decoder_toy",
        *unclip_overrides(tmp_path, cache_dir),
        f"paths.output_dir={tmp_path}/decoder_run",
        "callbacks.export.at_steps=[1]",
        tiny=False,
    )
    train(decoder_cfg)
    decoder = tmp_path / "decoder_run" / "decoder"
    projection, record = load_decoder(decoder)
    assert projection.config.num_tokens == 4
    assert record["step"] == 2 and record["trained_with"]["backbone"]["id"].startswith("build_tiny_stable_diffusion(")
    assert (tmp_path / "decoder_run" / "decoder-step1" / "unclip_decoder.json").exists()
    assert (decoder / "diffusion_pytorch_model.safetensors").exists()

    prior_cfg = compose(
        "+experiment=unclip_toy",
        *unclip_overrides(tmp_path, cache_dir),
        "llm=tiny",
        "llm.pooling=none",
        f"paths.output_dir={tmp_path}/prior_run",
        f"model.decoder={decoder}",
        tiny=False,
    )
    metrics = train(prior_cfg)
    assert "train/loss" in metrics and "val/prior" in metrics
    prior, record = load_prior(tmp_path / "prior_run" / "unclip")
    assert record["decoder"] == str(decoder.resolve()) and record["trained_with"]["llm"]["pooling"] == "none"
    assert bool((prior.transformer.clip_std > 0).all())  # fitted from the rows' embeddings before training
    exports = [json.loads(line)["file"] for line in (tmp_path / "prior_run" / "exports.jsonl").read_text().splitlines()]
    assert exports == ["unclip"]
    # Its text is the LLM's: no PriorTransformer for StableUnCLIPPipeline, and the record says why.
    assert record["prior_transformer"]["folder"] is None and "LLM" in record["prior_transformer"]["skipped"]
    assert not (tmp_path / "prior_run" / "unclip" / "prior_transformer").exists()


def test_the_sd21_preset_trains_a_prior_toward_clip_image_embeddings(compose, tmp_path, cache_dir):
    """+experiment=unclip_sd21 with tiny random parts (no hub): a CLIP vision model's image_embeds are the targets."""
    from sur_lightning.generation.unclip import load_prior
    from sur_lightning.models.image_tower import ClipVisionTower
    from sur_lightning.models.random_models import build_tiny_clip_vision
    from sur_lightning.train import train

    cfg = compose("+experiment=unclip_sd21", tiny=False)
    assert cfg.backbone.pretrained == "stabilityai/stable-diffusion-2-1" and cfg.llm.pooling == "none"
    assert cfg.model.image_tower._target_.endswith("ClipVisionTower") and cfg.model.decoder is None
    assert cfg.model.image_tower.folder == "openai/clip-vit-large-patch14"

    vision = build_tiny_clip_vision(cache_dir / "tiny-clip-vision")
    tower = ClipVisionTower(vision)
    assert tower.embed_images(torch.zeros(2, 3, 64, 64)).shape == (2, 16)
    cfg = compose(
        "+experiment=unclip_sd21",
        *unclip_overrides(tmp_path, cache_dir),
        "llm=tiny",
        "llm.pooling=none",
        f"model.image_tower.folder={vision}",
        "model.prior.num_layers=1",
        "model.prior.num_attention_heads=2",
        "model.prior.attention_head_dim=8",
        f"paths.output_dir={tmp_path}/sd21_run",
        tiny=False,
    )
    metrics = train(cfg)
    assert "train/loss" in metrics
    prior, record = load_prior(tmp_path / "sd21_run" / "unclip")
    assert prior.config.embedding_dim == 16 and record["image_tower"]["path"] == vision
    assert record["decoder"] is None
