"""The frozen-feature cache: bit-identical to a fresh encoder run, fingerprinted, require/auto, resumable,
atomic, and with a complete cache training builds no LLM and runs no VAE encoder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import open_cache
from hydra.utils import instantiate

from sur_lightning.data.datasets import CacheMissError, content_hash, preprocess
from sur_lightning.data.images import load_rgb
from sur_lightning.training import feature_cache as cache_module
from sur_lightning.training.feature_cache import build_cache, extra_prompts, missing_entries, prepare_feature_cache
from sur_lightning.training.feature_store import FeatureCache
from sur_lightning.training.module import ConnectorTrainingModule


def cached_config(compose, tmp_path, *overrides):
    return compose(
        f"data.cache_dir={tmp_path / 'features'}",
        "data.cache=auto",
        "data.batch_size=1",
        "data.root.num_images=6",
        *overrides,
    )


def test_cache_returns_bit_identical_tensors_to_a_fresh_encoder_run(compose, tmp_path, backbone, llm):
    cfg = cached_config(compose, tmp_path)
    datamodule = instantiate(cfg.data)
    cache = open_cache(cfg)
    build_cache(datamodule, cache, extra_prompts(cfg.get("callbacks")), backbone=backbone)
    assert sum(len(v) for v in missing_entries(cache, datamodule, ["", "two red circles"]).values()) == 0

    rows = datamodule.all_rows()
    for prompt in [rows[0].simple, ""]:
        cached = cache.text_features([prompt])
        assert torch.equal(cached.clip, backbone.encode_prompt([prompt]))
        assert torch.equal(cached.llm, llm([prompt])[0])
    complex_states = FeatureCache.lookup(cache.clip, rows[0].complex)["states"]
    assert torch.equal(complex_states[None], backbone.encode_prompt([rows[0].complex]))
    row = datamodule.train_set.rows[0]
    data = datamodule.train_set.image_bytes(row)
    entry = cache.latents.get(cache.latents.key(content_hash(data), "center"))
    image, _ = load_rgb(data)
    fresh = backbone.encode_images(preprocess(image, 64, True, False)[None])
    assert torch.equal(entry["mean"], fresh.mean[0]) and torch.equal(entry["logvar"], fresh.logvar[0])

    # The training dataset serves the cached moments, and latents() samples them like the encoder's own.
    datamodule.use_latent_store(cache.latents)
    example = datamodule.train_set[0]
    assert "pixel_values" not in example and example["latent_mean"].shape == (4, 16, 16)
    module = SimpleNamespace(backbone=backbone)
    from_cache = ConnectorTrainingModule.latents(
        module,
        {"latent_mean": entry["mean"][None], "latent_logvar": entry["logvar"][None]},
        torch.Generator().manual_seed(0),
    )
    from_pixels = ConnectorTrainingModule.latents(
        module, {"pixel_values": preprocess(image, 64, True, False)[None]}, torch.Generator().manual_seed(0)
    )
    assert torch.equal(from_cache, from_pixels)


def test_a_changed_fingerprint_triggers_recomputation(compose, tmp_path, backbone):
    cfg = cached_config(compose, tmp_path)
    cache = open_cache(cfg)
    build_cache(instantiate(cfg.data), cache, extra_prompts(cfg.get("callbacks")), backbone=backbone)
    changed = cached_config(compose, tmp_path, "llm.layer=1", "data.random_flip=true")
    datamodule = instantiate(changed.data)
    datamodule.setup("fit")
    other = open_cache(changed)
    assert other.llm.folder != cache.llm.folder and other.clip.folder == cache.clip.folder
    missing = missing_entries(other, datamodule, extra_prompts(changed.get("callbacks")))
    rows = len(datamodule.train_set.rows)
    val_rows = len(datamodule.val_set.rows) if datamodule.val_set else 0
    # A new LLM layer: every LLM entry again; a flip variant: one more latent per training image
    # (validation images are never flipped); CLIP is reused.
    assert len(missing["llm"]) == len(cache.llm) and len(missing["latents"]) == rows and not missing["clip"]
    build_cache(datamodule, other, extra_prompts(changed.get("callbacks")), backbone=backbone)
    assert len(open_cache(changed).latents) == 2 * rows + val_rows


def test_require_fails_on_a_missing_entry_naming_its_key(compose, tmp_path):
    cfg = cached_config(compose, tmp_path, "data.cache=require")
    with pytest.raises(
        CacheMissError, match=r"data.cache=require .* the first: latents of metadata.jsonl:\d+ .* key [0-9a-f]{40}"
    ):
        build_cache(instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")), mode="require")


def test_an_interrupted_build_resumes_and_half_written_files_are_ignored(compose, tmp_path, backbone, monkeypatch):
    cfg = cached_config(compose, tmp_path)
    monkeypatch.setattr(cache_module, "SHARD_ENTRIES", 2)
    real_write = cache_module.FeatureStore.write
    calls = {"n": 0}

    def write_then_die(self, entries, bad=None):
        calls["n"] += 1
        if self.kind == "latents" and calls["n"] > 1 and any(s.kind == "latents" for s in written):
            # A writer killed mid-shard leaves a temporary file behind.
            (self.folder / ".tmp-shard-killed.safetensors").write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt
        written.append(self)
        return real_write(self, entries, bad)

    written: list = []
    monkeypatch.setattr(cache_module.FeatureStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_cache(instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")), backbone=backbone)
    monkeypatch.setattr(cache_module.FeatureStore, "write", real_write)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    partial = open_cache(cfg)
    assert len(partial.latents) == 2  # the one shard written before the kill; the .tmp file is not read
    missing = missing_entries(partial, datamodule, extra_prompts(cfg.get("callbacks")))
    images = len(datamodule.all_rows())  # training and validation images, one plain variant each
    assert len(missing["latents"]) == images - 2 and not missing["clip"] and not missing["llm"]
    encoded = []
    monkeypatch.setattr(
        backbone, "encode_images", lambda x: encoded.append(len(x)) or type(backbone).encode_images(backbone, x)
    )
    build_cache(datamodule, partial, extra_prompts(cfg.get("callbacks")), backbone=backbone)
    assert sum(encoded) == images - 2
    assert len(open_cache(cfg).latents) == images


def test_with_a_complete_cache_no_llm_is_built_and_no_vae_encoder_runs(compose, tmp_path, backbone, monkeypatch):
    from diffusers.models.autoencoders.vae import Encoder

    from sur_lightning.models.llm import CausalLMFeatures
    from sur_lightning.train import train

    cfg = cached_config(
        compose,
        tmp_path,
        "data.cache=require",
        "trainer.max_steps=2",
        "+trainer.limit_val_batches=0",
        "~callbacks.sample_grid",
    )
    build_cache(instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")), backbone=backbone)

    def refuse(*args, **kwargs):
        raise AssertionError("constructed or ran with a complete cache")

    monkeypatch.setattr(CausalLMFeatures, "__init__", refuse)
    monkeypatch.setattr(Encoder, "forward", refuse)
    kwargs = prepare_feature_cache(instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")))
    assert kwargs["llm"] is None and kwargs["llm_dim"] == 32 and kwargs["backbone"].vae.encoder is None
    # Encoding with that backbone later says why it cannot, instead of failing on a None inside diffusers.
    with pytest.raises(
        RuntimeError, match=r"VAE encoder was dropped \(training reads cached latents: data.cache=require\)"
    ):
        kwargs["backbone"].encode_images(torch.zeros(1, 3, 64, 64))
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_under_ddp_only_rank_0_builds_and_the_other_ranks_wait(compose, tmp_path, monkeypatch):
    import threading

    from sur_lightning.models.llm import CausalLMFeatures

    cfg = cached_config(compose, tmp_path)
    loaded_by = []
    real_init = CausalLMFeatures.__init__

    def recording_init(self, *args, **kwargs):
        loaded_by.append(threading.current_thread().name)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMFeatures, "__init__", recording_init)
    result = {}

    def rank_1():
        result["rank1"] = prepare_feature_cache(
            instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")), rank=1, poll_s=0.05
        )

    waiter = threading.Thread(target=rank_1, name="rank1")
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive()  # nothing cached yet: rank 1 waits rather than building
    rank0 = prepare_feature_cache(instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")), rank=0)
    waiter.join(timeout=60)
    assert not waiter.is_alive() and loaded_by == ["MainThread"]  # only rank 0 ran the LLM
    assert len(result["rank1"]["feature_cache"].latents) == len(rank0["feature_cache"].latents) > 0


def test_a_waiting_rank_gives_up_after_cache_wait_s_naming_the_key(compose, tmp_path):
    cfg = cached_config(compose, tmp_path, "cache_wait_s=0.2")
    with pytest.raises(CacheMissError, match=r"rank 3: the feature cache is still incomplete after 0 s .*cache_wait_s"):
        prepare_feature_cache(
            instantiate(cfg.data),
            open_cache(cfg),
            extra_prompts(cfg.get("callbacks")),
            rank=3,
            poll_s=0.05,
            wait_s=cfg.cache_wait_s,
        )
