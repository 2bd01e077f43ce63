"""Trained connectors in unmodified diffusers pipelines (``sur_lightning.attach``), connector folders
(``save_pretrained`` / ``load_connector``) that record what they were trained for, and ``generate`` /
``evaluate`` taking the backbone and LLM from that record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sur_lightning
from sur_lightning.models.connectors import ConnectorMismatchError, TextFeatures, save_connector
from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta

PROMPTS = ["two red circles", "one blue square"]
SEEDS = [0, 1]


def sur_connector(dim: int, llm_dim: int, pooled_dim: int | None = None) -> SURAdapter:
    torch.manual_seed(0)
    sur = SURAdapter(
        dim=dim, llm_dim=llm_dim, eta=FixedEta(0.5), num_layers=1, num_heads=2, ff_dim=32, pooled_dim=pooled_dim
    )
    with torch.no_grad():  # a trained adapter is not the identity its zero-initialised output starts as
        sur.fc.weight.normal_(std=0.5)
        if sur.pooled_head is not None:
            sur.pooled_head.weight.normal_(std=0.5)
    return sur.eval()


def ella_connector(dim: int, llm_dim: int, pooled_dim: int | None = None) -> TimestepAwareSemanticConnector:
    torch.manual_seed(0)
    return TimestepAwareSemanticConnector(
        dim=dim,
        llm_dim=llm_dim,
        num_blocks=1,
        num_heads=2,
        num_latents=8,
        time_channels=16,
        time_embed_dim=32,
        pooled_dim=pooled_dim,
        pooled="learned" if pooled_dim else "clip",
    ).eval()


def record(backbone_target: str, folder: str, tiny_llm: str) -> dict:
    from sur_lightning.models.connectors import training_record

    llm = {
        "_target_": "sur_lightning.models.llm.CausalLMFeatures",
        "pretrained": tiny_llm,
        "layer": -1,
        "pooling": "none",
    }
    return training_record({"_target_": backbone_target, "pretrained": folder}, llm, cache_fingerprint={"clip": "abc"})


BACKBONES = {
    "sd": ("sur_lightning.models.backbone.StableDiffusionBackbone", "StableDiffusionPipeline"),
    "sdxl": ("sur_lightning.models.sdxl.StableDiffusionXLBackbone", "StableDiffusionXLPipeline"),
}


def generate_images(folder: Path, out: Path, tmp_path: Path, cache_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """``python -m sur_lightning.generate adapters=[folder]`` with no backbone or LLM chosen: the recorded ones."""
    from conftest import CONFIG_DIR
    from hydra import compose, initialize_config_dir

    from sur_lightning.generate import generate

    overrides = [
        f"adapters=['{folder}']",
        f"prompts=[{','.join(PROMPTS)}]",
        f"seeds=[{SEEDS[0]},{SEEDS[1]}]",
        "include_base=false",
        "sampler.num_inference_steps=3",
        "sampler.guidance_scale=4.0",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={out}",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="generate", overrides=overrides)
    generate(cfg, overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        (item["prompt"], item["seed"]): np.asarray(Image.open(out / item["file"]), dtype=np.int16)
        for item in manifest["images"]
    }


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("connector_kind", ["sur", "ella"])
def test_a_stock_pipeline_with_the_attached_connector_draws_what_generate_draws(
    kind, connector_kind, tiny_sd, tiny_sdxl, tiny_llm, llm, cache_dir, tmp_path
):
    import diffusers

    target, pipeline_class = BACKBONES[kind]
    folder = tiny_sd if kind == "sd" else tiny_sdxl
    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    dim = pipe.unet.config.cross_attention_dim
    pooled_dim = pipe.text_encoder_2.config.projection_dim if kind == "sdxl" else None
    build = sur_connector if connector_kind == "sur" else ella_connector
    connector = build(dim, llm.hidden_size, pooled_dim)
    saved = connector.save_pretrained(tmp_path / "adapter", trained_with=record(target, folder, tiny_llm))

    expected = generate_images(saved, tmp_path / "generate", tmp_path, cache_dir)
    loaded = sur_lightning.load_connector(saved)
    with sur_lightning.attach(pipe, loaded) as attached:
        for prompt in PROMPTS:
            for seed in SEEDS:
                image = attached(
                    prompt,
                    negative_prompt="",
                    num_inference_steps=3,
                    guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
                difference = np.abs(np.asarray(image, dtype=np.int16) - expected[(prompt, seed)])
                assert difference.max() <= 2, (prompt, seed, difference.max())
    # Outside the block the pipeline is stock again: its own CLIP conditioning, another image.
    assert "encode_prompt" not in vars(pipe) and not pipe.unet._forward_pre_hooks
    plain = pipe(
        PROMPTS[0],
        negative_prompt="",
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(SEEDS[0]),
    ).images[0]
    assert np.abs(np.asarray(plain, dtype=np.int16) - expected[(PROMPTS[0], SEEDS[0])]).max() > 2


def test_sur_conditions_through_prompt_embeds_and_ella_at_every_timestep(tiny_sd, tiny_llm, llm):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    dim = pipe.unet.config.cross_attention_dim
    sur = sur_connector(dim, llm.hidden_size)
    with sur_lightning.attach(pipe, sur):
        embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 2, True, None)
    clip, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, None)
    expected = sur(TextFeatures(clip=clip)).conditioning
    assert embeds.shape == (4, 77, dim) and negative.shape == (4, 77, dim)
    torch.testing.assert_close(embeds[::2], expected)
    torch.testing.assert_close(embeds[1::2], expected)
    assert not torch.allclose(embeds[0], negative[0])

    from sur_lightning.models.llm import CausalLMFeatures

    ella = ella_connector(dim, llm.hidden_size)
    seen = []
    ella.register_forward_hook(lambda module, args, out: seen.append(args[1].flatten()[0].item()))
    with sur_lightning.attach(pipe, ella, llm=CausalLMFeatures(tiny_llm, pooling="none")):
        pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    # Two connector calls (negative, prompt) per UNet call, at the pipeline's three timesteps.
    assert len(seen) == 6 and len(set(seen)) == 3


def test_attach_needs_the_prompt_text_and_a_fitting_width(tiny_sd, tiny_sdxl, llm):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    sur = sur_connector(pipe.unet.config.cross_attention_dim, llm.hidden_size)
    with sur_lightning.attach(pipe, sur), pytest.raises(ValueError, match="needs the text itself"):
        pipe(prompt_embeds=torch.zeros(1, 77, pipe.unet.config.cross_attention_dim), num_inference_steps=1)
    wide = sur_connector(48, llm.hidden_size)
    with (
        pytest.raises(ConnectorMismatchError, match="width 48.*width 32|width 32.*width 48"),
        sur_lightning.attach(pipe, wide),
    ):
        pass
    with (
        pytest.raises(ValueError, match="record no LLM.*llm="),
        sur_lightning.attach(pipe, ella_connector(32, llm.hidden_size)),
    ):
        pass


def test_a_connector_folder_records_kind_backbone_llm_and_cache(tmp_path, tiny_sd, tiny_llm, llm):
    sur = sur_connector(32, llm.hidden_size)
    folder = sur.save_pretrained(tmp_path / "adapter", trained_with=record(BACKBONES["sd"][0], tiny_sd, tiny_llm))
    config = json.loads((folder / "config.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert config["kind"] == "sur" and config["connector"]["_target_"].endswith("SURAdapter")
    trained = config["trained_with"]
    assert trained["backbone"]["id"] == tiny_sd and trained["llm"]["id"] == tiny_llm
    assert trained["llm"]["layer"] == -1 and trained["llm"]["pooling"] == "none"
    assert trained["cache_fingerprint"] == {"clip": "abc"}

    loaded = SURAdapter.from_pretrained(folder, dim=32)
    clip = torch.randn(2, 77, 32)
    torch.testing.assert_close(loaded(TextFeatures(clip=clip)).conditioning, sur(TextFeatures(clip=clip)).conditioning)
    assert loaded.trained_with == trained
    with pytest.raises(ConnectorMismatchError, match=r"cross-attention width 32 .*width 48"):
        sur_lightning.load_connector(folder, dim=48)
    with pytest.raises(ConnectorMismatchError, match=rf"LLM width {llm.hidden_size}.*width 7"):
        sur_lightning.load_connector(folder, llm_dim=7)
    with pytest.raises(TypeError, match="not a TimestepAwareSemanticConnector"):
        TimestepAwareSemanticConnector.from_pretrained(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json: key 'connector'"):
        sur_lightning.load_connector(folder)


def test_generate_takes_an_adapter_files_backbone_from_its_run_and_a_chosen_one_wins(tmp_path, tiny_sdxl, cache_dir):
    """An adapter.safetensors from before the folder format: the backbone comes from its run's .hydra/config.yaml."""
    import yaml
    from conftest import CONFIG_DIR
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sur_lightning.config import column_arguments, use_recorded
    from sur_lightning.generation.columns import adapter_records, grid_columns

    run = tmp_path / "outputs" / "demo" / "runs" / "2026-12-03_10-00-00"
    (run / ".hydra").mkdir(parents=True)
    backbone = {"_target_": BACKBONES["sdxl"][0], "pretrained": tiny_sdxl, "dtype": "float32"}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": "demo", "backbone": backbone}))
    path, _ = save_connector(sur_connector(48, 16, pooled_dim=32), run / "adapter.safetensors")

    def configured(*extra):
        overrides = [f"adapters=['{path}']", f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *extra]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="generate", overrides=overrides), overrides

    cfg, overrides = configured("backbone.dtype=bfloat16")
    assert use_recorded(cfg, adapter_records(cfg.adapters), overrides) == [
        f"backbone: {tiny_sdxl} (recorded by {path}; set backbone=... to choose another)"
    ]
    assert (
        cfg.backbone.pretrained == tiny_sdxl and cfg.backbone.dtype == "bfloat16"
    )  # the dotted override still applies
    cfg, overrides = configured("backbone=tiny")
    assert use_recorded(cfg, adapter_records(cfg.adapters), overrides) == []
    with pytest.raises(ConnectorMismatchError, match="cross-attention width 48 .*width 32"):
        grid_columns(instantiate(cfg.backbone), [], **column_arguments(cfg))


def draw(pipe, connector) -> np.ndarray:
    """One 2-step image of PROMPTS[0] through ``connector`` attached to ``pipe``."""
    with sur_lightning.attach(pipe, connector) as attached:
        image = attached(
            PROMPTS[0], num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)
        ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def tiny_pipe(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("connector_kind", ["sur", "ella"])
def test_the_folder_and_the_single_file_both_load_and_attach_alike(
    connector_kind, tiny_pipe, tiny_sd, tiny_llm, llm, tmp_path
):
    """What AdapterExport writes: ``adapter/`` (config.json + model.safetensors) and ``adapter.safetensors`` + .json,
    both with the record; the file alone (no run config beside it) must give ELLA its LLM as the folder does."""
    build = sur_connector if connector_kind == "sur" else ella_connector
    connector = build(32, llm.hidden_size)
    trained_with = record(BACKBONES["sd"][0], tiny_sd, tiny_llm)
    folder = connector.save_pretrained(tmp_path / "adapter", trained_with=trained_with)
    file, _ = save_connector(connector, tmp_path / "adapter.safetensors", trained_with)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.json", "adapter.safetensors"]

    from_folder, from_file = sur_lightning.load_connector(folder), sur_lightning.load_connector(file)
    assert from_file.trained_with == from_folder.trained_with == trained_with
    images = [draw(tiny_pipe, loaded) for loaded in (from_folder, from_file)]
    assert np.array_equal(images[0], images[1])


def test_an_adapter_file_without_a_record_resolves_its_runs_saved_config(
    tiny_pipe, tiny_llm, llm, tmp_path, monkeypatch
):
    """An ELLA adapter.safetensors written before the header held the record: its LLM comes from the run's
    .hydra/config.yaml, which Hydra saves unresolved (``${paths.cache_dir}``, ``${hydra:runtime.cwd}``)."""
    import yaml

    monkeypatch.delenv("SUR_LIGHTNING_ROOT", raising=False)
    monkeypatch.delenv("SUR_LIGHTNING_CACHE", raising=False)
    cache = Path(tiny_llm).parent
    run = tmp_path / "outputs" / "ella_demo" / "runs" / "2026-12-06_10-00-00"
    (run / ".hydra").mkdir(parents=True)
    # As Hydra writes it (conf/paths/default.yaml, conf/llm/tiny.yaml), trimmed; from before issue 33, when the
    # tiny LLM's builder lived in models/llm.py (connector_record renames it to where it is now).
    saved = {
        "task_name": "ella_demo",
        "paths": {
            "root_dir": "${oc.env:SUR_LIGHTNING_ROOT,${hydra:runtime.cwd}}",
            "cache_dir": "${oc.env:SUR_LIGHTNING_CACHE,${paths.root_dir}/" + cache.name + "}",
        },
        "connector": {"_target_": "sur_lightning.models.connectors.ella.TimestepAwareSemanticConnector"},
        "backbone": {"_target_": BACKBONES["sd"][0], "pretrained": "${paths.cache_dir}/tiny-sd"},
        "llm": {
            "_target_": "sur_lightning.models.llm.CausalLMFeatures",
            "pretrained": {
                "_target_": "sur_lightning.models.llm.build_tiny_causal_lm",
                "root": "${paths.cache_dir}/tiny-llm",
            },
            "layer": -1,
            "pooling": "${llm_pooling:${oc.select:connector._target_,null}}",
        },
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"cwd": str(cache.parent)}}}))
    connector = ella_connector(32, llm.hidden_size)
    path, _ = save_connector(connector, run / "adapter.safetensors")

    loaded = sur_lightning.load_connector(path)
    assert loaded.trained_with["llm"]["config"]["pretrained"]["root"] == tiny_llm
    assert loaded.trained_with["llm"]["config"]["pooling"] == "none"
    assert loaded.trained_with["backbone"]["id"] == str(cache / "tiny-sd")
    assert draw(tiny_pipe, loaded).shape == (64, 64, 3)  # built the recorded LLM and drew
    # Without the saved Hydra values the node stays as saved, and attach says what to pass instead of an
    # OmegaConf traceback.
    (run / ".hydra" / "hydra.yaml").unlink()
    with pytest.raises(ValueError, match=r"do not resolve outside its training run.*attach\(\.\.\., llm="):
        draw(tiny_pipe, sur_lightning.load_connector(path))
