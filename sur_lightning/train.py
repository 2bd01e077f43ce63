"""Train a connector: ``python -m sur_lightning.train +experiment=demo``.

Reads like a recipe: check the config, pin the threads, seed, build data, model, callbacks, loggers and trainer from
the config, log the resolved config, fit, write ``metrics.json`` and say where everything went.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from sur_lightning.config import (
    CONFIG_DIR,
    check_combination,
    check_config,
    datamodule_arguments,
    use_wandb_offline_without_key,
)
from sur_lightning.runtime import environment, pin_threads
from sur_lightning.training.feature_cache import prepare_feature_cache


def train(cfg: DictConfig) -> dict[str, float]:
    check_combination(cfg)
    resolved = check_config(cfg)
    if cfg.trainer.get("use_distributed_sampler", True):
        # Lightning's DistributedSampler would replace the datamodule's EpochSampler, which shards the data itself.
        raise ValueError(
            "trainer.use_distributed_sampler must be false: each rank reads its share of one seeded order "
            "(sur_lightning.data.datamodule.EpochSampler), which is what makes DDP match one process and resume mid-epoch"
        )
    use_wandb_offline_without_key()
    # Before any work: a run's float sums, and so its result, depend on the thread count (sur_lightning/runtime.py).
    pin_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    # data.cache=auto|require: fill or check the feature cache; with it complete, no LLM is built.
    model = instantiate(cfg.model, **prepare_feature_cache(cfg, datamodule))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams({**resolved, "environment": environment()})

    try:
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"),
                    weights_only=cfg.get("ckpt_weights_only", True))
    except SIGTERMException:
        # OnExceptionCheckpoint has written checkpoints/on_exception.ckpt; exit as a terminated process does.
        print(f"\nSIGTERM at step {trainer.global_step}: checkpoint in {Path(cfg.paths.output_dir) / 'checkpoints'}; "
              "resume with ckpt_path=last", flush=True)
        raise SystemExit(143) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        report_outputs(cfg, trainer, callbacks, loggers, metrics)
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        import wandb

        # Close the run so the next job of a multirun in this process starts its own.
        wandb.finish()
    return metrics


def report_outputs(cfg, trainer, callbacks, loggers, metrics: dict[str, float]) -> None:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.json"
    record = {"global_step": trainer.global_step, **metrics, "environment": environment()}
    metrics_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    lines = [f"metrics:    {metrics_path}"]
    if (output_dir / "data_report.json").exists():
        lines.append(f"data:       {output_dir / 'data_report.json'} (skipped, repaired and truncated rows)")
    for callback in callbacks:
        name = type(callback).__name__
        if name == "AdapterExport" and callback.last_folder:
            lines.append(f"adapter:    {callback.last_folder} (config.json + model.safetensors; sur_lightning.load_connector)")
        elif name == "AdapterExport" and callback.last_path:
            lines.append(f"adapter:    {callback.last_path} (+ {callback.last_path.with_suffix('.json').name})")
        elif name == "SampleGrid" and callback.last_path:
            lines.append(f"samples:    {callback.last_path}")
        elif name == "ModelCheckpoint" and callback.last_model_path:
            lines.append(f"checkpoint: {callback.last_model_path}")
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            mode = os.environ.get("WANDB_MODE", "online")
            run = logger.experiment
            lines.append(f"wandb:      {Path(run.dir).parent} ({mode}): run {run.name!r}, group {run.group!r}, job_type {run.job_type!r}")
        elif getattr(logger, "log_dir", None):
            lines.append(f"{type(logger).__name__}: {logger.log_dir}")
    print("\n".join(["", f"Run finished at step {trainer.global_step}. Outputs:"] + ["  " + x for x in lines]))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # A sweeper optimising `optimized_metric` reads this return value.
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
