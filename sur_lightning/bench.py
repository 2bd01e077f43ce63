"""How much a training step costs above the floor, and what a connector adds to generation.

    python -m sur_lightning.bench                          # tiny backbone, well under a minute on a CPU
    python -m sur_lightning.bench backbone=toy data=toyworld bench.steps=30
    python -m sur_lightning.bench +experiment=sur_paper backbone=sd15 ...   (any training config)

**The floor** is the least a connector's training step can cost once every frozen encoder is cached: one
forward pass of the frozen UNet and the backward pass that carries the gradient to its conditioning
input. The benchmark measures it alone, then the real training step (``ConnectorTrainingModule.training_step``
+ backward + optimizer, from the real dataloader) with a warm feature cache and with ``data.cache=off``,
split into data / connector / UNet forward / rest of the forward / backward / optimizer; peak memory;
and pipeline latency for one prompt with and without the connector, with the time spent inside the connector's
own calls (whole renders drift by several % between calls on a shared machine). ``trainer.precision`` is applied
as Lightning's autocast; memory growth is read from current RSS (CPU) or CUDA allocated memory (GPU) after the
warm-up (``bench.steps=200`` for the leak check); ``bench.steps=0`` measures generation alone. It prints JSON and
a table and writes ``bench.json``. It measures; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sur_lightning.config import (
    CONFIG_DIR,
    datamodule_arguments,
    feature_cache_arguments,
    use_wandb_offline_without_key,
)
from sur_lightning.training.benchmark import (
    batches,
    floor_ratio_rounds,
    floor_time,
    inference_latency,
    machine,
    peak_rss_mb,
    table,
    training_step_time,
)
from sur_lightning.training.feature_cache import check_name_dropout, extra_prompts, prepare_feature_cache
from sur_lightning.training.feature_store import FeatureCache


def build(cfg: DictConfig, cache: str, device: torch.device):
    """Datamodule, module (frozen encoders replaced by the cache when it is on) and optimizer, as train.py builds them."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.data.cache = cache
    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    check_name_dropout(datamodule, OmegaConf.select(cfg, "llm.rag"))
    if cache == "off":
        frozen = {"backbone": instantiate(cfg.backbone), "llm": instantiate(cfg.llm) if cfg.get("llm") else None}
    else:
        feature_cache = FeatureCache.open(**feature_cache_arguments(cfg))
        frozen = prepare_feature_cache(
            datamodule, feature_cache, extra_prompts(cfg.get("callbacks")), wait_s=cfg.get("cache_wait_s")
        )
    module = instantiate(cfg.model, **frozen).to(device)
    datamodule.setup("fit")
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    return datamodule, module, optimizer


def training_step_time_of(cfg: DictConfig, cache: str, device: torch.device, steps: int, warmup: int) -> dict:
    """``training_step_time`` of the module ``build`` gives for ``data.cache=<cache>``, built after seeding with 0."""
    torch.manual_seed(0)
    datamodule, module, optimizer = build(cfg, cache, device)
    return training_step_time(datamodule, module, optimizer, device, steps, warmup, cfg.trainer.get("precision"))


def run(cfg: DictConfig) -> dict:
    use_wandb_offline_without_key()
    # The module runs without a Trainer here, so every self.log() would warn once per call site.
    warnings.filterwarnings("ignore", message=r".*self.trainer. reference is not registered")
    settings = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() and settings.device != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"machine": machine()}
    if settings.steps:
        warm = training_step_time_of(cfg, "auto", device, settings.steps, settings.warmup)
        module, batch, optimizer, data = warm.pop("module"), warm.pop("batch"), warm.pop("optimizer"), warm.pop("data")
        floor = floor_time(module, batch, device, settings.steps, settings.warmup, cfg.trainer.get("precision"))
        rounds = (
            floor_ratio_rounds(
                module,
                optimizer,
                data,
                batch,
                device,
                settings.ratio_rounds,
                settings.round_steps,
                cfg.trainer.get("precision"),
            )
            if settings.ratio_rounds
            else None
        )
        result.update(
            {
                "floor_s": floor,
                "warm_cache": warm["seconds"],
                # The ratio from alternating rounds when measured (bench.ratio_rounds), else from the two runs above.
                "warm_cache_ratio_to_floor": rounds["ratio_median"] if rounds else warm["seconds"]["step"] / floor,
                "floor_ratio": rounds,
                # CUDA allocated on a GPU, current RSS on a CPU; run bench.steps=200 for the leak check.
                "memory_growth_mb_over_steps": warm["memory_growth_mb"],
            }
        )
    elif settings.inference_steps:  # bench.steps=0: generation latency only
        datamodule, module, _ = build(cfg, "auto", device)
        batch = next(batches(datamodule, device))
    else:
        raise ValueError("bench.steps=0 and bench.inference_steps=0 leave nothing to measure")
    result["config"] = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True).get("pretrained"),
        "connector": cfg.connector._target_,
        "precision": str(cfg.trainer.get("precision")),
        "dtype": str(module.backbone.unet.dtype),
        "batch_size": int(cfg.data.batch_size),
        "steps": settings.steps,
        "warmup": settings.warmup,
    }
    if settings.steps and settings.cache_off:
        cold = training_step_time_of(cfg, "off", device, settings.steps, settings.warmup)
        # Generation encodes its prompts itself: time it on the module without the cache.
        module = cold.pop("module")
        cold.pop("batch")
        result["cache_off"] = cold["seconds"]
        result["cache_speedup"] = cold["seconds"]["step"] / warm["seconds"]["step"]
        # Every frozen encoder every step is the official SUR loop's work (VAE encode, CLIP twice) plus the LLM.
        result["warm_cache_ratio_to_cache_off"] = warm["seconds"]["step"] / cold["seconds"]["step"]
    if settings.inference_steps:
        # A training prompt: with the cache on, the module reads its text features from the cache.
        prompt = batch["simple_prompt"][0]
        result["inference"] = inference_latency(
            module, device, prompt, settings.inference_steps, settings.inference_repeats
        )
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n" + table(result))
    print(f"\nwrote {out / 'bench.json'}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
