"""Precompute everything frozen: ``python -m sur_lightning.cache +experiment=demo`` (same conf/ as training).

Fills the feature cache that ``data.cache=auto|require`` training reads (VAE latents, CLIP states, LLM
states; see ``sur_lightning/training/feature_store.py``), then prints each store's size and folder.
With ``data.cache=require`` it only checks, naming the first missing entry.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from sur_lightning.config import CONFIG_DIR, datamodule_arguments, feature_cache_arguments
from sur_lightning.training.feature_cache import build_cache, extra_prompts
from sur_lightning.training.feature_store import FeatureCache


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    mode = "require" if cfg.data.get("cache") == "require" else "auto"
    started = time.perf_counter()
    cache = FeatureCache.open(**feature_cache_arguments(cfg))
    build_cache(datamodule, cache, extra_prompts(cfg.get("callbacks")), mode)
    print(datamodule.report)
    print(f"Feature cache complete in {time.perf_counter() - started:.1f} s:")
    for store in (cache.latents, cache.clip, cache.llm):
        if store is not None:
            print(f"  {store.kind:8s} {len(store):7d} entries  {store.folder}")
    if datamodule.report_dir:
        print(f"  report   {Path(datamodule.report_dir) / 'data_report.json'}")


if __name__ == "__main__":
    main()
