"""Dataloader samples/s and training steps/s with the feature cache warm versus ``data.cache=off``, tiny backbone.

    make bench-data            (or: python experiments/bench_data/bench.py --steps 30 --images 64)

Measures and prints; not a test. Both runs use the same config (+experiment=sur_demo on the tiny SD and
tiny LLM by default) and differ only in ``data.cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sur_lightning.config import CONFIG_DIR, feature_cache_arguments
from sur_lightning.training.feature_cache import build_cache, extra_prompts, prepare_feature_cache
from sur_lightning.training.feature_store import FeatureCache


def open_cache(cfg) -> FeatureCache:
    return FeatureCache.open(**feature_cache_arguments(cfg))


def config(root: Path, cache: str, args) -> object:
    overrides = [
        "+experiment=sur_demo",
        f"llm={args.llm}",
        "logger=csv",
        "~callbacks.sample_grid",
        f"paths.root_dir={root}",
        f"paths.cache_dir={args.cache_dir}",
        f"paths.output_dir={root}/run-{cache}",
        f"data.root.num_images={args.images}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "data.val_size=4",
        f"data.cache={cache}",
        f"data.cache_dir={root}/features",
        f"trainer.max_steps={args.steps}",
        "+trainer.limit_val_batches=0",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def loader_rate(datamodule, batches: int) -> float:
    """Samples/s of the training dataloader alone (the first batch, with worker start-up, excluded)."""
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    started, samples = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        samples += len(batch["id"])
    return samples / (time.perf_counter() - started)


class StepTimer(L.Callback):
    """Training steps/s after the first two steps (warm-up)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())

    def rate(self) -> float:
        times = self.times[2:]
        return (len(times) - 1) / (times[-1] - times[0])


def measure(root: Path, cache: str, args) -> dict:
    cfg = config(root, cache, args)
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    started = time.perf_counter()
    datamodule.setup("fit")
    # data.cache=off: the model builds its frozen encoders itself (not timed as setup).
    model_kwargs = (
        {}
        if cache == "off"
        else prepare_feature_cache(datamodule, open_cache(cfg), extra_prompts(cfg.get("callbacks")))
    )
    setup_s = time.perf_counter() - started
    samples_per_s = loader_rate(datamodule, args.loader_batches)
    model = instantiate(cfg.model, **model_kwargs)
    timer = StepTimer()
    trainer = instantiate(
        cfg.trainer, callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model=model, datamodule=datamodule)
    return {
        "data.cache": cache,
        "loader samples/s": round(samples_per_s, 1),
        "train steps/s": round(timer.rate(), 2),
        "setup s": round(setup_s, 1),
        "llm built": model.llm is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--llm", default="tiny", help="llm config: tiny (random, fast) or smollm2 (real 135M)")
    parser.add_argument("--cache-dir", default=str(Path(".cache").resolve()), help="where the tiny models are built")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_started = time.perf_counter()
        cfg = config(root, "auto", args)
        build_cache(instantiate(cfg.data), open_cache(cfg), extra_prompts(cfg.get("callbacks")))
        build_s = time.perf_counter() - build_started
        results = [measure(root, "off", args), measure(root, "require", args)]
    print(f"\ncache build (cold, {args.images} images, llm={args.llm}): {build_s:.1f} s")
    header = list(results[0])
    print(" | ".join(header))
    for row in results:
        print(" | ".join(str(row[k]) for k in header))
    speedup = results[1]["train steps/s"] / results[0]["train steps/s"]
    print(f"steps/s warm cache / off: {speedup:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
