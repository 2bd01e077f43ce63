"""Prompts → images with the base model and with trained connectors, same seeds, side by side.

    python -m sur_lightning.generate adapters=[outputs/demo/runs/<time>/adapter.safetensors]
    python -m sur_lightning.generate adapters=[<adapter>] eta_sweep=[0.1,0.5,1.0]
    python -m sur_lightning.generate backbone=sd15 llm=llama13b adapters=[<adapter>] prompts=counting

writes, under the run folder: ``images/<column>/<prompt id>_seed<seed>.png``, ``grid.png`` (one column
per base/adapter/η, one row per prompt and seed), ``strips/<adapter>/<prompt id>_seed<seed>.png`` when
η is swept, and ``manifest.json`` saying what produced each image. How a connector conditions the UNet:
``sur_lightning/generation/conditioning.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sur_lightning.config import CONFIG_DIR, check_config, column_arguments, command_line_overrides, use_recorded
from sur_lightning.data.prompt_suites import load_prompt_list
from sur_lightning.generation.columns import adapter_records, grid_columns, random_backbone_warning
from sur_lightning.generation.grids import write_grids
from sur_lightning.generation.manifest import write_manifest
from sur_lightning.generation.pipeline import render_columns, sampler_kwargs
from sur_lightning.runtime import pick_device


def generate(cfg, overrides: list[str] | None = None) -> dict:
    """Render ``cfg.prompts`` × ``cfg.seeds`` through the base model and every adapter; write images, grid,
    η strips and ``manifest.json`` into ``cfg.paths.output_dir``. Returns the written paths.

    The backbone and LLM are the ones the adapters were trained with, unless ``overrides`` (default: the command
    line) choose them (``config.use_recorded``)."""
    overrides = command_line_overrides() if overrides is None else overrides
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    for note in use_recorded(cfg, adapter_records(cfg.get("adapters"), cfg.get("unclip")), overrides):
        print(note, flush=True)
    resolved = check_config(cfg)
    backbone = instantiate(cfg.backbone).to(pick_device(cfg.device))
    prompts = load_prompt_list(cfg.prompts, cfg.get("num_prompts"))
    columns = grid_columns(backbone, prompts, **column_arguments(cfg))
    warning = random_backbone_warning(backbone, cfg.adapters)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    kwargs = sampler_kwargs(cfg.sampler)
    rendered = render_columns(
        backbone, columns, prompts, list(cfg.seeds), out_dir, negative_prompt=cfg.negative_prompt, **kwargs
    )
    written = write_grids(rendered, columns, out_dir, strips=bool(cfg.eta_sweep))
    written["manifest"] = str(write_manifest(out_dir, rendered, columns, resolved))
    print(f"\nWrote {len(rendered)} images to {out_dir / 'images'}\n  grid:     {written['grid']}")
    if written.get("strips"):
        print(f"  η strips: {Path(written['strips'][0]).parent}")
    print(f"  manifest: {written['manifest']}")
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
