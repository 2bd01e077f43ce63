"""Callbacks that write what a run leaves behind: the adapter file and the base-vs-adapter sample grid."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from sur_lightning.connectors import save_connector
from sur_lightning.generate import labelled_grid, render_base_and_adapter, save_grid


class AdapterExport(L.Callback):
    """Writes the connector alone (``adapter.safetensors`` + ``adapter.json``) at the end of training,
    and every ``every_n_steps`` optimizer steps when set (``adapter-step{N}.safetensors``)."""

    def __init__(self, dirpath: str, filename: str = "adapter", every_n_steps: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_steps = every_n_steps
        self.last_path: Path | None = None
        self._last_step = -1

    @rank_zero_only
    def export(self, pl_module, name: str) -> Path:
        path, _ = save_connector(pl_module.connector, self.dirpath / f"{name}.safetensors")
        self.last_path = path
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same step: export once.
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.export(pl_module, f"{self.filename}-step{step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(pl_module, self.filename)


class SampleGrid(L.Callback):
    """Renders fixed prompts with fixed seeds through the base model and through the adapter, and
    writes a labelled grid (``samples/step{N}.png``), also logged as an image to W&B / TensorBoard.

    Runs every ``every_n_steps`` optimizer steps (when set) and once at the end of training.
    """

    def __init__(
        self,
        dirpath: str,
        prompts: list[str],
        seeds: list[int] | None = None,
        every_n_steps: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        resolution: int | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.prompts = list(prompts)
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.prompts)))
        if len(self.seeds) != len(self.prompts):
            raise ValueError(f"callbacks.sample_grid: {len(self.prompts)} prompts but {len(self.seeds)} seeds")
        self.every_n_steps = every_n_steps
        self.kwargs = {
            "scheduler": scheduler,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": resolution,
            "width": resolution,
        }
        self.last_path: Path | None = None
        self._last_step = -1

    @rank_zero_only
    def sample(self, trainer, pl_module) -> Path:
        base, adapted = render_base_and_adapter(pl_module, self.prompts, self.seeds, **self.kwargs)
        grid = labelled_grid({"base": base, "adapter": adapted}, self.prompts)
        path = save_grid(grid, self.dirpath / f"step{trainer.global_step:06d}.png")
        self.last_path = path
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], caption=["base | adapter"], step=trainer.global_step)
            elif hasattr(logger.experiment, "add_image"):
                import numpy as np

                logger.experiment.add_image("samples", np.asarray(grid), trainer.global_step, dataformats="HWC")
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.sample(trainer, pl_module)
