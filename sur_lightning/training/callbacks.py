"""Callbacks that write what a run leaves behind: the adapter file, the base-vs-adapter sample grid, and
(opt-in, ``callbacks=with_evaluation``) metrics of a small prompt suite every N steps; and (opt-in,
``callbacks/ema=on``) an exponential moving average of the connector weights, which the others then use."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from sur_lightning.generation.grids import labelled_grid, save_grid
from sur_lightning.generation.pipeline import render_base_and_adapter
from sur_lightning.models.connectors import CONFIG_NAME, save_connector, save_pretrained, training_record

log = logging.getLogger(__name__)


def plain(node):
    """A config node (as Hydra passes it with ``_recursive_: false``) as plain, resolved containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class EveryNSteps(L.Callback):
    """Base of the callbacks below: ``due(step)`` is true every ``every_n_steps`` optimizer steps, at each
    step listed in ``at_steps`` (a learning curve's log-spaced budgets: 300, 600, 1200, ...), and with
    ``at_end`` at the end of training, but only once per step — with gradient accumulation several batches
    end on the same step."""

    def __init__(self, every_n_steps: int | None, at_steps: list[int] | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.at_steps = {int(step) for step in at_steps or ()}
        self._last_step = -1

    def due(self, step: int, at_end: bool = False) -> bool:
        periodic = bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0
        if step == self._last_step or not (periodic or step in self.at_steps or at_end):
            return False
        self._last_step = step
        return True


class ConnectorEMA(L.Callback):
    """Exponential moving average of the connector's trainable parameters, as diffusers' ``--use_ema``.

    After every optimizer step: ema ← d·ema + (1 − d)·θ, starting from θ before the first step, with
    d = ``decay``, or with ``warmup`` diffusers' ``EMAModel`` default d_t = min(decay, (1 + t)/(10 + t))
    for the t-th update (t = 0, 1, ...), so early averages are not stuck near the initial weights.
    Training goes on with the raw weights; validation, the sample grid, the evaluation and the exported
    adapter see the averaged ones (``averaged``). Lightning's ``EMAWeightAveraging`` would deep-copy the
    whole LightningModule, frozen UNet and LLM included; this keeps one copy of the connector's trainable
    tensors. The averages and the update count are part of the checkpoint, so they survive a resume.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.averages: dict[str, torch.Tensor] | None = None
        self.updates = 0
        self._last_step = -1
        self._validating = contextlib.nullcontext()

    @staticmethod
    def parameters(pl_module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.connector.named_parameters() if p.requires_grad}

    def decay_at(self, update: int) -> float:
        """d for the ``update``-th update (0-based)."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    def on_fit_start(self, trainer, pl_module) -> None:
        params = self.parameters(pl_module)
        if self.averages is None:
            self.averages = {name: p.detach().clone() for name, p in params.items()}
        elif self.averages.keys() != params.keys():
            raise ValueError(
                "callbacks.ema: the checkpoint's averages do not match the connector's trainable parameters"
            )
        else:  # loaded from a checkpoint (on the CPU)
            self.averages = {name: v.to(params[name].device, params[name].dtype) for name, v in self.averages.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # With gradient accumulation several batches end on the same optimizer step: update once.
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        weight = 1.0 - self.decay_at(self.updates)
        for name, p in self.parameters(pl_module).items():
            self.averages[name].lerp_(p.detach(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def averaged(self, pl_module):
        """Within the block the connector holds the averaged weights; afterwards its raw weights again."""
        if self.averages is None:
            yield
            return
        params = self.parameters(pl_module)
        raw = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.averages[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._validating = self.averaged(pl_module)
        self._validating.__enter__()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._validating.__exit__(None, None, None)

    def state_dict(self) -> dict:
        averages = {name: v.detach().cpu() for name, v in (self.averages or {}).items()}
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "averages": averages}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.averages = dict(state["averages"]) or None


def averaged_weights(pl_module):
    """A context in which the connector holds its EMA weights when a ``ConnectorEMA`` callback is on, else nothing."""
    trainer = pl_module._trainer
    ema = next((c for c in trainer.callbacks if isinstance(c, ConnectorEMA)), None) if trainer is not None else None
    return ema.averaged(pl_module) if ema is not None else contextlib.nullcontext()


class AdapterExport(EveryNSteps):
    """Writes the connector alone at the end of training: the folder ``adapter/`` (``save_pretrained``:
    ``config.json`` with what it was trained for, ``model.safetensors``), which ``sur_lightning.load_connector``
    and ``generate``/``evaluate`` read, and the single file ``adapter.safetensors`` + ``adapter.json`` that the
    learning curves and the benchmark read. Every ``every_n_steps`` optimizer steps or at each of ``at_steps``
    when set it writes ``adapter-step{N}.safetensors`` (files only).

    ``trained_with``: ``{"backbone": <node>, "llm": <node or None>}``, the run's backbone and LLM config nodes;
    ``training_record`` of them goes into ``adapter/config.json`` and into every file's safetensors header.
    conf/callbacks/*.yaml fill it with ``${backbone}`` / ``${llm}`` and ``_recursive_: false``, so Hydra hands
    the resolved nodes over instead of building them. That is explicit and works however the config was made
    (``hydra.compose`` in tests writes no ``.hydra/config.yaml`` to read back). The widths and the feature
    cache's fingerprints come from the trained module itself at export time.

    Each export appends ``{"step", "train_seconds", "file"}`` to ``exports.jsonl``: the learning curve's
    x-axes. ``train_seconds`` is wall time inside ``fit`` since the first step (feature-cache building and
    model loading excluded), carried in the checkpoint so that a resumed run continues the count.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "adapter",
        every_n_steps: int | None = None,
        at_steps: list[int] | None = None,
        trained_with: dict | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_steps)
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.trained_with = plain(trained_with) or {}
        self.last_path: Path | None = None
        self.last_folder: Path | None = None
        self.seconds_before = 0.0  # training seconds of the runs this one resumed
        self._started: float | None = None

    def record(self, pl_module) -> dict:
        """``training_record`` of this run: the config nodes given, the module's widths and cache fingerprints."""
        backbone = getattr(pl_module, "backbone", None)  # None: a generator of its own (PixelSNAIL, the VQ tokenizer)
        llm, cache = getattr(pl_module, "llm", None), getattr(pl_module, "feature_cache", None)
        backbone_node = self.trained_with.get("backbone")
        if backbone_node is None and backbone is not None:  # built without a config (tests, scripts): name the model
            backbone_node = {
                "_target_": f"{type(backbone).__module__}.{type(backbone).__name__}",
                "pretrained": getattr(backbone, "pretrained", None),
            }
        llm_node = self.trained_with.get("llm")
        llm_width = (
            getattr(llm, "hidden_size", None) if llm is not None else (cache.llm_dim if cache is not None else None)
        )
        fingerprints = None
        if cache is not None:
            fingerprints = {
                "latents": cache.latents.fingerprint_hash,
                "clip": cache.clip.fingerprint_hash,
                "llm": cache.llm.fingerprint_hash if cache.llm is not None else None,
            }
        return training_record(
            backbone_node, llm_node, getattr(backbone, "cross_attention_dim", None), llm_width, fingerprints
        )

    def train_seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def write(self, pl_module, name: str, record: dict, folder: bool) -> tuple[Path, Path | None]:
        """Writes export ``name``: the file the learning curve reads, and the folder when ``folder``."""
        # The file's header carries the record too, so the file alone is as usable as the folder (the run's
        # .hydra/config.yaml is unresolved: `${paths.cache_dir}` means nothing outside this run's config).
        with averaged_weights(pl_module):
            path, _ = save_connector(pl_module.connector, self.dirpath / f"{name}.safetensors", record)
            saved = save_pretrained(pl_module.connector, self.dirpath / name, record) if folder else None
        return path, saved

    @rank_zero_only
    def export(self, pl_module, name: str, folder: bool = False) -> Path:
        path, saved = self.write(pl_module, name, self.record(pl_module), folder)
        self.last_path = path
        if saved is not None:
            self.last_folder = saved
        export = {"step": pl_module.global_step, "train_seconds": round(self.train_seconds(), 2), "file": path.name}
        with open(self.dirpath / "exports.jsonl", "a", encoding="utf-8") as log_file:
            log_file.write(json.dumps(export) + "\n")
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer.global_step):
            self.export(pl_module, f"{self.filename}-step{trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(pl_module, self.filename, folder=True)
        self.log_artifact(trainer)

    def artifact_metadata(self, trainer) -> dict:
        """What the W&B UI shows of the final folder: its ``config.json``'s connector config and ``trained_with``."""
        config = json.loads((self.last_folder / CONFIG_NAME).read_text())
        return {
            "step": trainer.global_step,
            "kind": config.get("kind"),
            "connector": config.get("connector"),
            "trained_with": config.get("trained_with"),
        }

    @rank_zero_only
    def log_artifact(self, trainer) -> None:
        """The final folder as a W&B artifact of type "model" (``<filename>-<run id>``, aliases ``latest`` and
        ``step<N>``) with ``artifact_metadata`` as its metadata, so the W&B UI shows what the model was trained for
        and ``run.use_artifact`` fetches it."""
        runs = [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not runs or self.last_folder is None:
            return
        import wandb

        metadata = self.artifact_metadata(trainer)
        for run in runs:
            artifact = wandb.Artifact(f"{self.filename}-{run.id}", type="model", metadata=metadata)
            artifact.add_dir(str(self.last_folder))
            run.log_artifact(artifact, aliases=["latest", f"step{trainer.global_step}"])

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before = float(state.get("train_seconds", 0.0))


class ModelExport(AdapterExport):
    """``AdapterExport`` for the trained models that are not connectors (unCLIP's decoder and prior, the VQ
    tokenizer, PixelSNAIL): at the same steps it writes the folder ``<dirpath>/<filename>`` (``<filename>-step{N}``
    at ``every_n_steps`` / ``at_steps``) that the module's ``export_pretrained(folder, trained_with)`` fills
    (``trained_with``: ``training_record``, the backbone and LLM it read), with the same ``exports.jsonl`` lines
    (the learning curve's x-axes, ``learning_curve.exported_adapters(run, prefix=...)``). The final folder is also
    a W&B artifact of type "model" (``<filename>-<run id>``)."""

    def write(self, pl_module, name: str, record: dict, folder: bool) -> tuple[Path, Path]:
        # The connectors' record (training_record: backbone and LLM nodes, widths, cache fingerprints), which
        # generate/evaluate read back (columns.use_recorded).
        path = pl_module.export_pretrained(self.dirpath / name, record)
        if folder:
            log.info(f"{type(pl_module).__name__}: exported {path}")
        return path, path if folder else None

    def artifact_metadata(self, trainer) -> dict:
        return {"step": trainer.global_step}


class SampleGrid(EveryNSteps):
    """Renders fixed prompts with fixed seeds through the base model and through the adapter, and
    writes a labelled grid (``samples/step{N}.png``), also logged as an image to W&B / TensorBoard.

    ``prompts``: a list of strings, or anything ``generate.load_prompt_list`` reads (a toy-world suite).
    When the prompts carry a ``complex`` prompt, a third column shows the base model given that one:
    base + simple | adapter + simple | base + complex, the lower bound, the method and the upper bound.
    Runs every ``every_n_steps`` optimizer steps (when set), at each of ``at_steps`` (conf/callbacks/toyworld.yaml:
    the adapter's export steps) and once at the end of training.
    ``mode``: "replace" or "concat_clip" (ELLA + CLIP), as in ``sur_lightning.generate``.
    """

    def __init__(
        self,
        dirpath: str,
        prompts,
        seeds: list[int] | None = None,
        every_n_steps: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        resolution: int | None = None,
        mode: str = "replace",
        at_steps: list[int] | None = None,
    ) -> None:
        from sur_lightning.data.prompt_suites import load_prompt_list

        super().__init__(every_n_steps, at_steps)
        self.dirpath = Path(dirpath)
        loaded = load_prompt_list(prompts)
        self.prompts = [p.prompt for p in loaded]
        self.complex_prompts = [p.complex for p in loaded] if all(p.complex for p in loaded) else None
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.prompts)))
        if len(self.seeds) != len(self.prompts):
            raise ValueError(f"callbacks.sample_grid: {len(self.prompts)} prompts but {len(self.seeds)} seeds")
        self.kwargs = {
            "scheduler": scheduler,
            "mode": mode,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": resolution,
            "width": resolution,
        }
        self.last_path: Path | None = None

    @rank_zero_only
    def sample(self, trainer, pl_module) -> Path:
        with averaged_weights(pl_module):
            base, adapted = render_base_and_adapter(pl_module, self.prompts, self.seeds, **self.kwargs)
        if self.complex_prompts is None:
            columns = {"base": base, "adapter": adapted}
        else:
            upper, _ = render_base_and_adapter(
                pl_module, self.complex_prompts, self.seeds, adapter=False, **self.kwargs
            )
            columns = {"base + simple": base, "adapter + simple": adapted, "base + complex": upper}
        grid = labelled_grid(columns, self.prompts)
        path = save_grid(grid, self.dirpath / f"step{trainer.global_step:06d}.png")
        self.last_path = path
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], caption=[" | ".join(columns)], step=trainer.global_step)
            elif hasattr(logger.experiment, "add_image"):
                import numpy as np

                logger.experiment.add_image("samples", np.asarray(grid), trainer.global_step, dataformats="HWC")
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer.global_step):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.due(trainer.global_step, at_end=True):
            self.sample(trainer, pl_module)


class EvaluationCallback(EveryNSteps):
    """Scores a small prompt suite every ``every_n_steps`` optimizer steps (or at each of ``at_steps``: a
    learning curve in one run) and at the end of training.

    Renders ``prompts`` × ``seeds`` through the connector (and once through the base model, whose scores
    cannot change), scores them with ``sur_lightning.evaluation.evaluator.Evaluator`` (``metrics``: the same keys as
    ``metrics`` in conf/evaluate.yaml), logs ``eval/adapter/<metric>`` and ``eval/base/<metric>`` to every
    logger and to ``trainer.callback_metrics`` (so ``metrics.json`` and sweepers see them), and writes
    ``<dirpath>/step{N}.json``. The metrics' weights load at ``setup``: a missing file fails before training.

    With a toy-world suite (prompts that carry a ``complex`` prompt and a target) the base model also
    renders the complex prompts ("base+complex", the upper bound), and the share of the base's
    simple-vs-complex gap the adapter closes is logged per split as ``eval/gap_closed/<split>/<metric>``, and
    to W&B as the table ``eval/splits`` (one row per split and column, with the gap closed and its interval)
    at every evaluation; ``print_table`` logs the accuracy table at the end of training.

    ``report_dir``: at the end of training, the last evaluation is written there as ``report.json`` and
    ``report.md`` (conf/callbacks: the run folder, beside ``metrics.json``).

    ``retriever``: the LLM's ``llm.rag`` (a ``knowledge.rag.Retriever``), or None. When its ``variant_mean`` is
    on, the adapter is read as the mean of its outputs over each prompt's renamed variants
    (``VariantMeanConditioning``), as ``generate`` and ``evaluate`` read the exported adapter, so the figures
    logged during training are the ones those commands give. The variants' features are cached with the
    evaluation prompts (``training.feature_cache.extra_prompts``).
    """

    def __init__(
        self,
        dirpath: str,
        prompts,
        metrics: dict,
        seeds: list[int] | None = None,
        num_prompts: int | None = None,
        every_n_steps: int | None = None,
        at_steps: list[int] | None = None,
        reference=None,
        reference_size: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        resolution: int | None = None,
        batch_size: int = 8,
        mode: str = "replace",
        print_table: bool = False,
        report_dir: str | None = None,
        retriever=None,
    ) -> None:
        from sur_lightning.data.prompt_suites import load_prompt_list

        super().__init__(every_n_steps, at_steps)
        self.dirpath = Path(dirpath)
        self.prompts = load_prompt_list(prompts, num_prompts)
        self.retriever = retriever
        self.seeds = list(seeds) if seeds is not None else [0]
        self.metrics = dict(metrics)
        self.reference = reference
        self.reference_size = reference_size
        self.mode = mode
        self.kwargs = {
            "scheduler": scheduler,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": resolution,
            "width": resolution,
            "batch_size": batch_size,
        }
        self.print_table = print_table
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self.evaluator = None
        self.base_scores: dict | None = None
        self.base_rows: list[dict] = []
        self.last_report: dict | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_path: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.evaluator is None and trainer.is_global_zero:
            from sur_lightning.evaluation.evaluator import Evaluator

            self.evaluator = Evaluator(
                reference=self.reference,
                reference_size=self.reference_size,
                device=str(trainer.strategy.root_device),
                **self.metrics,
            )

    def adapter_conditioning(self, pl_module):
        """How the adapter column reads the connector: as the mean over renamed variants when the retriever says
        ``variant_mean``, else directly."""
        from sur_lightning.generation.conditioning import read_connector

        # The Retriever refuses variant_mean without a renamer.
        mean_over_variants = self.retriever is not None and self.retriever.variant_mean
        renamer = self.retriever.renamer if mean_over_variants else None
        return read_connector(pl_module.connector, pl_module.text_features, self.mode, renamer=renamer)

    @rank_zero_only
    def evaluate(self, trainer, pl_module, progress: bool = False) -> dict[str, float]:
        from sur_lightning.evaluation.evaluator import score_columns
        from sur_lightning.evaluation.report import gap_closed, gap_closed_intervals, split_rows
        from sur_lightning.generation.columns import Column, complex_prompt_column
        from sur_lightning.generation.conditioning import ClipConditioning, frozen_text_features
        from sur_lightning.generation.pipeline import render_columns

        step = trainer.global_step
        columns = [Column("adapter", self.adapter_conditioning(pl_module))]
        if self.base_scores is None:  # the frozen base's images cannot change: render them once
            upper = complex_prompt_column(pl_module.backbone, self.prompts)
            columns[:0] = [Column("base", ClipConditioning(frozen_text_features(pl_module.backbone)))]
            columns[1:1] = [upper] if upper is not None else []
        was_training = pl_module.connector.training
        pl_module.connector.eval()
        try:
            with torch.no_grad(), averaged_weights(pl_module):
                rendered = render_columns(
                    pl_module.backbone, columns, self.prompts, self.seeds, progress=progress, **self.kwargs
                )
        finally:
            pl_module.connector.train(was_training)
        report = score_columns(self.evaluator, rendered)
        if self.base_scores is None:
            self.base_scores = {k: v for k, v in report["columns"].items() if k != "adapter"}
            self.base_rows = [row for row in report["images"] if row["column"] != "adapter"]
        scores = {**self.base_scores, "adapter": report["columns"]["adapter"]}
        metrics = {
            f"eval/{column}/{name}": float(v) for column, summary in scores.items() for name, v in summary.items()
        }
        report = {
            "columns": scores,
            "images": self.base_rows + [r for r in report["images"] if r["column"] == "adapter"],
        }
        if "base+complex" in scores:
            report["gap_closed"] = gap_closed(report)
            # Bootstrapped once here for the W&B table, the printed table and the report files alike.
            report["gap_closed_ci95"] = gap_closed_intervals(report)
            for split, closed in report["gap_closed"]["adapter"].items():
                metrics |= {f"eval/gap_closed/{split}/{k}": float(v) for k, v in closed.items() if v is not None}
        self.last_report = report
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if "gap_closed" in report and isinstance(logger, WandbLogger):
                columns, rows = split_rows(report)
                logger.log_table(key="eval/splits", columns=columns, data=rows, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.last_path = self.dirpath / f"step{step:06d}.json"
        self.last_path.write_text(json.dumps({"step": step, **report}, indent=2))
        self.last_metrics = metrics
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer.global_step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.due(trainer.global_step, at_end=True):
            # The end-of-training evaluation renders hundreds of images after the training bar has closed: show a bar.
            self.evaluate(trainer, pl_module, progress=True)
        if not trainer.is_global_zero or not self.last_report:
            return
        if self.print_table and "gap_closed" in self.last_report:
            from sur_lightning.evaluation.report import toyworld_table

            log.info(f"\nToy world, step {trainer.global_step}\n{toyworld_table(self.last_report)}\n")
        if self.report_dir is not None:
            from sur_lightning.evaluation.report import write_report

            settings = {
                "step": trainer.global_step,
                "prompts": len(self.prompts),
                "seeds": self.seeds,
                "metrics": self.metrics,
                "mode": self.mode,
                **self.kwargs,
            }
            json_path, md_path = write_report(self.report_dir, self.last_report, settings)
            log.info(f"evaluation report: {md_path} (+ {json_path.name})")
