"""Prompt suite → images (base and adapters, or a generate run's folder) → metrics report.

    python -m sur_lightning.evaluate                                   # offline: tiny SD, shapes, shape accuracy + FID/KID
    python -m sur_lightning.evaluate adapters=[outputs/demo/runs/<time>/adapter.safetensors]
    python -m sur_lightning.evaluate images_dir=outputs/generate/runs/<time>   # score a generate run's images
    python -m sur_lightning.evaluate backbone=sd15 prompts=counting reference=/path/to/coco/val \\
        'metrics.compute=[clip,fid,captions,diversity]' seeds=[0,1,2,3]

Writes ``report.json`` (every metric per column, per-image scores), ``report.md`` (a markdown table)
and, with ``logger=wandb``, a W&B table with the images. The metrics: ``sur_lightning/evaluation/evaluator.py``.
``+experiment=NAME`` evaluates that training preset's latest adapter with the backbone and LLM it was trained with.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from sur_lightning.config import (
    CONFIG_DIR,
    check_config,
    column_arguments,
    command_line_overrides,
    evaluator_arguments,
    use_recorded,
    use_wandb_offline_without_key,
)
from sur_lightning.data.prompt_suites import load_prompt_list
from sur_lightning.evaluation.evaluator import Evaluator, score_columns
from sur_lightning.evaluation.report import log_report, markdown_table, toyworld_table, write_report
from sur_lightning.generation.columns import adapter_records, grid_columns
from sur_lightning.generation.grids import write_grids
from sur_lightning.generation.manifest import read_manifest, write_manifest
from sur_lightning.generation.pipeline import render_columns, sampler_kwargs
from sur_lightning.runtime import pick_device


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Load the metrics, generate (or read) the images, score every column, write the report. Returns it.
    The backbone and LLM: the adapters' own unless ``overrides`` (default: the command line) choose them."""
    from hydra.utils import instantiate

    overrides = command_line_overrides() if overrides is None else overrides
    for note in (
        []
        if cfg.get("images_dir")
        else use_recorded(cfg, adapter_records(cfg.get("adapters"), cfg.get("unclip")), overrides)
    ):
        print(note, flush=True)
    resolved = check_config(cfg)
    use_wandb_offline_without_key()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    evaluator = Evaluator(**evaluator_arguments(cfg))  # weights first: a missing file fails before any generation

    if cfg.get("images_dir"):
        rendered = read_manifest(cfg.images_dir)
    else:
        backbone = instantiate(cfg.backbone).to(pick_device(cfg.device))
        prompts = load_prompt_list(cfg.prompts, cfg.get("num_prompts"))
        columns = grid_columns(backbone, prompts, **column_arguments(cfg))
        rendered = render_columns(
            backbone,
            columns,
            prompts,
            list(cfg.seeds),
            out_dir,
            negative_prompt=cfg.negative_prompt,
            **sampler_kwargs(cfg.sampler),
        )
        write_grids(rendered, columns, out_dir, strips=bool(cfg.eta_sweep))
        write_manifest(out_dir, rendered, columns, resolved)

    report = score_columns(evaluator, rendered)
    settings = {
        k: resolved.get(k) for k in ("prompts", "num_prompts", "seeds", "reference", "metrics", "sampler", "images_dir")
    }
    json_path, md_path = write_report(out_dir, report, settings)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    log_report(loggers, report, rendered)
    for logger in loggers:
        logger.finalize("success")
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        import wandb

        wandb.finish()
    print("\n" + markdown_table(report["columns"]))
    if "gap_closed" in report:
        print("\n" + toyworld_table(report))
    print(f"\nreport: {json_path}\n        {md_path}")
    return report


def latest_adapter(log_dir: Path, experiment: str) -> Path:
    """The newest adapter of a training preset's runs and multirun jobs under ``log_dir``: its ``adapter/`` folder,
    or for a run older than the folder format its ``adapter.safetensors``."""
    adapters = sorted((log_dir / experiment).glob("*runs/**/adapter.safetensors"), key=lambda p: p.stat().st_mtime)
    if not adapters:
        raise SystemExit(
            f"evaluate +experiment={experiment}: no trained adapter under {log_dir / experiment}. Train one "
            f"(python -m sur_lightning.train +experiment={experiment}) or pass adapters=[path/to/adapter.safetensors]"
        )
    folder = adapters[-1].with_suffix("")  # AdapterExport's adapter/ folder, with what it was trained for
    return folder if (folder / "config.json").exists() else adapters[-1]


def preset_overrides(args: list[str], log_dir: Path) -> list[str]:
    """``+experiment=NAME`` names a training preset, which is not an evaluate config: it becomes the
    overrides that evaluate NAME's latest adapter (with the backbone and LLM it recorded, and the toy-world
    suite for a toy-world run unless the user adds it). The user's other overrides come after, so they still win."""
    presets = [a.partition("=")[2] for a in args if a.partition("=")[0].lstrip("+~") == "experiment"]
    rest = [a for a in args if a.partition("=")[0].lstrip("+~") != "experiment"]
    if not presets:
        return args
    if len(presets) > 1:
        raise SystemExit(f"evaluate: one +experiment at a time, got {presets}")
    import yaml

    adapter = latest_adapter(log_dir, presets[0])
    hydra_file = adapter.parent / ".hydra" / "hydra.yaml"
    choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"] if hydra_file.exists() else {}
    # The backbone and LLM come from what the adapter recorded (config.use_recorded).
    overrides = [f"adapters=['{adapter}']"]
    # `+suite=toyworld` typed as well (as the README's toy-world commands have it) must not add the suite twice.
    user_suite = any(a.partition("=")[0].lstrip("+~") == "suite" for a in rest)
    if choices.get("data") == "toyworld" and not user_suite:
        overrides.append("+suite=toyworld")
    print(f"evaluate +experiment={presets[0]}: {' '.join(overrides)}", flush=True)
    return overrides + rest


def log_dir_from(args: list[str]) -> Path:
    """Where training runs are (``paths.log_dir``), as train.py's config resolves it from the command line."""
    values = dict(a.split("=", 1) for a in args if "=" in a)
    if "paths.log_dir" in values:
        return Path(values["paths.log_dir"])
    root = values.get("paths.root_dir") or os.environ.get("SUR_LIGHTNING_ROOT") or os.getcwd()
    return Path(root) / "outputs"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    report = evaluate(cfg)
    # A sweeper optimising `optimized_metric` (e.g. "adapter/kid_mean") reads this return value.
    key = cfg.get("optimized_metric")
    if key:
        column, _, name = key.rpartition("/")
        return report["columns"][column][name]
    return None


if __name__ == "__main__":
    sys.argv[1:] = preset_overrides(sys.argv[1:], log_dir_from(sys.argv[1:]))
    main()
