"""Train a connector: ``python -m sur_lightning.train +experiment=demo``.

Reads like a recipe: check the config, pin the threads, seed, build the data, the frozen backbone and LLM (or the
feature cache that replaces them), the model with them, callbacks, loggers and trainer from the config, log the
resolved config, fit, write ``metrics.json`` and say where everything went.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sur_lightning.config import (
    CONFIG_DIR,
    check_combination,
    check_config,
    command_line_overrides,
    datamodule_arguments,
    feature_cache_arguments,
    process_rank,
    run_checkpoint,
    use_wandb_offline_without_key,
)
from sur_lightning.data.surd import PrecomputedLLMFeatures
from sur_lightning.runtime import environment, pin_threads
from sur_lightning.training.callbacks import AdapterExport, ModelExport, SampleGrid
from sur_lightning.training.feature_cache import check_name_dropout, extra_prompts, prepare_feature_cache
from sur_lightning.training.feature_store import FeatureCache

# `python -m sur_lightning.train` runs this module as __main__: name its logger as the module.
log = logging.getLogger("sur_lightning.train")


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
    quiet_third_party_noise()
    checkpoint = resume_checkpoint(cfg)
    # Before any work: a run's float sums, and so its result, depend on the thread count (sur_lightning/runtime.py).
    pin_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    takes_frozen_encoders = getattr(get_class(cfg.model._target_), "takes_frozen_encoders", None)
    if takes_frozen_encoders is None:
        # A model that builds what it reads (the VQ tokenizer its VAE, PixelSNAIL its text encoder over its code
        # database): no frozen UNet and no feature cache to hand it.
        frozen = {}
    elif not takes_frozen_encoders(cfg.model):
        # One that could read them but in this config does not (a prior on its pipeline's text encoder): no
        # backbone is loaded (SD 2.1's 5 GB for nothing).
        frozen = {"backbone": None}
    else:
        # Name dropout renames training prompts only if the LLM's retriever undoes it (checked with the cache off too).
        check_name_dropout(datamodule, OmegaConf.select(cfg, "llm.rag"))
        if datamodule.cache == "off":
            # The frozen encoders run every step.
            frozen = {"backbone": instantiate(cfg.backbone), "llm": instantiate(cfg.llm) if cfg.get("llm") else None}
            if isinstance(frozen["llm"], PrecomputedLLMFeatures):
                datamodule.use_precomputed_llm(frozen["llm"])  # a simple prompt without a vector is a skipped row
        else:
            # data.cache=auto|require: fill or check the feature cache; with it complete, no LLM is built and the
            # backbone drops its VAE encoder.
            cache = FeatureCache.open(**feature_cache_arguments(cfg))
            frozen = prepare_feature_cache(
                datamodule, cache, extra_prompts(cfg.get("callbacks")), wait_s=cfg.get("cache_wait_s")
            )
    model = instantiate(cfg.model, **frozen)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = instantiate_loggers(cfg, checkpoint)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        # The overrides as typed, beside the config they produced: the W&B run name carries only their hash.
        logger.log_hyperparams({**resolved, "overrides": command_line_overrides(), "environment": environment()})

    try:
        trainer.fit(
            model=model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=cfg.get("ckpt_weights_only", True)
        )
    except SIGTERMException:
        # OnExceptionCheckpoint has written checkpoints/on_exception.ckpt; exit as a terminated process does.
        log.info(
            f"\nSIGTERM at step {trainer.global_step}: checkpoint in {Path(cfg.paths.output_dir) / 'checkpoints'}; "
            f"resume with ckpt_path=last, or ckpt_path={cfg.paths.output_dir}"
        )
        raise SystemExit(143) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        report_outputs(cfg, trainer, callbacks, loggers, metrics)
    if any(isinstance(logger, WandbLogger) for logger in loggers):
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
        if isinstance(callback, ModelExport) and callback.last_folder:
            lines.append(f"export:     {callback.last_folder} ({callback.filename}; generate/evaluate/explore read it)")
        elif isinstance(callback, AdapterExport) and callback.last_folder:
            lines.append(
                f"adapter:    {callback.last_folder} (config.json + model.safetensors; sur_lightning.load_connector)"
            )
        elif isinstance(callback, AdapterExport) and callback.last_path:
            lines.append(f"adapter:    {callback.last_path} (+ {callback.last_path.with_suffix('.json').name})")
        elif isinstance(callback, SampleGrid) and callback.last_path:
            lines.append(f"samples:    {callback.last_path}")
        elif isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            lines.append(f"checkpoint: {callback.last_model_path}")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            mode = os.environ.get("WANDB_MODE", "online")
            run = logger.experiment
            lines.append(
                f"wandb:      {Path(run.dir).parent} ({mode}): run {run.name!r}, group {run.group!r}, job_type {run.job_type!r}"
            )
        elif getattr(logger, "log_dir", None):
            lines.append(f"{type(logger).__name__}: {logger.log_dir}")
    log.info("\n".join(["", f"Run finished at step {trainer.global_step}. Outputs:"] + ["  " + x for x in lines]))


# ------------------------------------------------------------------------------------------ resuming in place


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint ``ckpt_path`` (conf/train.yaml) asks for, or None for a fresh run.

    ``last`` or a run folder: that run's newest checkpoint (``config.run_checkpoint``). Under Hydra the job
    already runs in that folder (``hydra.run.dir`` resolves it with ``config.run_dir``); a script that passes
    ``paths.output_dir`` resumes the run in that folder. Nothing to resume stops the run with a message, unless
    ``ckpt_path_optional=true``. Any other value is a checkpoint file for Lightning to load."""
    ckpt_path = cfg.get("ckpt_path")
    output_dir = Path(cfg.paths.output_dir)
    if ckpt_path is None:
        if run_checkpoint(output_dir) is None:
            # With OnExceptionCheckpoint on, Lightning turns ckpt_path=None into "last" and then warns twice that
            # there is no last checkpoint: false alarms in a fresh folder. In a reused folder they stay.
            warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model")
            warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')
        return None
    if str(ckpt_path) != "last" and not Path(ckpt_path).is_dir():
        return Path(ckpt_path)
    folder = output_dir if str(ckpt_path) == "last" else Path(ckpt_path)
    checkpoint = run_checkpoint(folder)
    if checkpoint is not None:
        in_place = folder.resolve() == output_dir.resolve()
        if in_place:  # ModelCheckpoint warns of any checkpoint folder that is not empty: here it is meant to be
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
        log.info(
            f"Resuming {folder} from {checkpoint.relative_to(folder)}"
            + ("" if in_place else f"; this run writes to {output_dir}")
        )
        return checkpoint
    if str(ckpt_path) == "last" and cfg.get("ckpt_path_optional", False):
        log.info(
            f"ckpt_path=last: no run of task {cfg.task_name!r} to resume; starting fresh in {output_dir} "
            "(ckpt_path_optional=true)"
        )
        return None
    where = (
        f"no run of task {cfg.task_name!r} under {Path(cfg.paths.log_dir) / cfg.task_name / 'runs'} has one"
        if str(ckpt_path) == "last"
        else f"ckpt_path={ckpt_path} is a folder without one"
    )
    message = (
        f"Nothing to resume: {where} (checkpoints/last.ckpt or checkpoints/on_exception.ckpt). "
        "Leave ckpt_path unset to start a new run, or add ckpt_path_optional=true to start fresh "
        "whenever ckpt_path=last finds nothing."
    )
    # Logged, so that the console and train.log say why, then a plain exit: a traceback would add nothing.
    log.error(message)
    raise SystemExit(1)


def instantiate_loggers(cfg: DictConfig, checkpoint: Path | None) -> list:
    """The loggers of ``cfg.logger``; a W&B logger continues the W&B run of the run folder it resumes."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        is_wandb = str(node.get("_target_", "")).endswith("WandbLogger")
        logger = instantiate(node, **(wandb_run_identity(cfg, node, checkpoint) if is_wandb else {}))
        if is_wandb and logger._wandb_init.get("anonymous", False) is None:
            # Lightning always passes anonymous=None, and wandb warns at every start that the setting is
            # deprecated; Lightning offers no switch, so the key is dropped before wandb.init reads it.
            del logger._wandb_init["anonymous"]
        loggers.append(logger)
    return loggers


def wandb_run_identity(cfg: DictConfig, node: DictConfig, checkpoint: Path | None) -> dict:
    """``id`` and ``name`` for the WandbLogger: the ones saved in ``<run>/wandb_run.json`` when this run
    resumes its own folder (WandbLogger resumes with ``resume="allow"``), else a new id, saved there.
    Nothing when ``logger.wandb.id`` is set: the user picked the run."""
    if node.get("id") is not None:
        return {}
    output_dir = Path(cfg.paths.output_dir)
    record = output_dir / "wandb_run.json"
    in_place = checkpoint is not None and checkpoint.resolve().parent.parent == output_dir.resolve()
    if in_place and record.exists():
        saved = json.loads(record.read_text())
        log.info(f"W&B: continuing run {saved['name']!r} (id {saved['id']})")
        return {"id": saved["id"], "name": saved["name"]}
    if process_rank() != 0:  # only rank 0 opens a W&B run
        return {}
    # W&B's own id format: 8 characters of [a-z0-9].
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    output_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"id": run_id, "name": node.name}, indent=2))
    return {"id": run_id}


# ------------------------------------------------------------------------------------------ the run's log


class _DropLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_third_party_noise() -> None:
    """Keep the console and ``train.log`` to what the run says.

    Dropped: Lightning's advertisement for litlogger (logged at INFO at every Trainer start) and its
    warning that the frozen backbone's modules are in eval mode (they are frozen on purpose). Under Hydra,
    whose job logging gives the root logger a file handler (``<run>/train.log``), Lightning's own log lines
    and Python warnings also go to that file (Lightning's docs: add a handler to "lightning.pytorch")."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitloggerTip) for f in logger.filters):
            logger.addFilter(_DropLitloggerTip())
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):  # each has its own console handler and does not propagate
        lightning_logger = logging.getLogger(name)
        # A multirun in one process gives each job a new file handler: drop the previous job's.
        for handler in [h for h in lightning_logger.handlers if isinstance(h, logging.FileHandler) and h not in files]:
            lightning_logger.removeHandler(handler)
        for handler in files:
            if handler not in lightning_logger.handlers:
                lightning_logger.addHandler(handler)
    if files:
        logging.captureWarnings(True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # A sweeper optimising `optimized_metric` reads this return value.
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
