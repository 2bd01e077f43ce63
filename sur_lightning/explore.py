"""unCLIP's generation tools on the base's and every connector's conditioning: interpolations, text diffs,
variations and best-of-N reranking.

    python -m sur_lightning.explore tool=interpolate adapters=[outputs/demo/runs/<time>/adapter]
    python -m sur_lightning.explore tool=interpolate tool.between=prompts prompts=[a tomato,a blueberry]
    python -m sur_lightning.explore tool=text_diff tool.source=tomato tool.target=blueberry adapters=[<adapter>]
    python -m sur_lightning.explore tool=variations tool.image=photo.png adapters=[<adapter>]
    python -m sur_lightning.explore tool=best_of_n tool/scorer=clip 'metrics.compute=[clip]' adapters=[<adapter>]
    python -m sur_lightning.explore tool=variations unclip=<prior export>   # unCLIP: the image embedding, new noise

Writes, under the run folder: ``grid.png`` (one row per strip, labelled), ``images/<tool>/...`` and ``manifest.json``
(every image with what made it: t, strength, scores). Best-of-N also writes its first-sample and best columns as a
generate run, so ``report.md`` (with ``metrics.compute``) or a later ``evaluate images_dir=<run>`` scores both.
The tools: ``sur_lightning/generation/tools.py``; the slerp and the blended conditionings: ``generation/interpolation.py``;
on an unCLIP column, the paper's tools in image-embedding space: ``generation/unclip.py`` (docs/unclip.md).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sur_lightning.config import (
    CONFIG_DIR,
    check_config,
    column_arguments,
    command_line_overrides,
    evaluator_arguments,
    use_recorded,
)
from sur_lightning.data.prompt_suites import load_prompt_list
from sur_lightning.evaluation.evaluator import Evaluator, score_columns
from sur_lightning.evaluation.report import markdown_table, toyworld_table, write_report
from sur_lightning.generation.columns import Column, adapter_records, grid_columns
from sur_lightning.generation.grids import labelled_grid, save_grid
from sur_lightning.generation.manifest import write_manifest
from sur_lightning.generation.pipeline import build_pipeline, sampler_kwargs
from sur_lightning.generation.tools import BestOfN, Setup
from sur_lightning.runtime import pick_device


def build_tool(node, backbone):
    """The tool of config ``node``. Its scorer (best-of-N), when the config makes it a partial (``_partial_: true``),
    is completed with the loaded backbone, so it reuses the frozen parts instead of loading a second copy."""
    if "scorer" not in node:
        return instantiate(node)
    scorer = instantiate(node.scorer)
    if isinstance(scorer, functools.partial):
        scorer = scorer(backbone=backbone)
    rest = OmegaConf.masked_copy(node, [k for k in node if k != "scorer"])
    return instantiate(rest, scorer=scorer)


def save_images(picture, out_dir: Path, tool_name: str) -> None:
    for index, item in enumerate(picture.images):
        relative = Path("images") / tool_name / f"{index:04d}_{item.prompt.id}_seed{item.seed}.png"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        item.image.save(out_dir / relative)
        item.file = str(relative)


def explore(cfg, overrides: list[str] | None = None) -> dict:
    """Run ``cfg.tool`` over the base and every adapter; write the grid, images and manifest (and, for best-of-N
    with ``metrics.compute``, the report) into ``cfg.paths.output_dir``. Returns the written paths."""
    overrides = command_line_overrides() if overrides is None else overrides
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    for note in use_recorded(cfg, adapter_records(cfg.get("adapters"), cfg.get("unclip")), overrides):
        print(note, flush=True)
    resolved = check_config(cfg)
    evaluator = (
        Evaluator(**evaluator_arguments(cfg)) if cfg.metrics.compute else None
    )  # weights first: fail before rendering
    backbone = instantiate(cfg.backbone).to(pick_device(cfg.device))
    prompts = load_prompt_list(cfg.prompts, cfg.get("num_prompts"))
    columns = grid_columns(backbone, prompts, **column_arguments(cfg))
    tool = build_tool(cfg.tool, backbone)
    tool_name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(tool).__name__).lower()  # Interpolation -> interpolation
    if evaluator is not None and not isinstance(tool, BestOfN):
        raise ValueError(
            f"metrics.compute scores best-of-N's columns; tool={tool_name} has none to score: set metrics.compute=[]"
        )
    sampler = sampler_kwargs(cfg.sampler)
    pipeline = build_pipeline(backbone, sampler.pop("scheduler"))
    sampler.pop("batch_size")
    with tqdm(desc=tool_name, unit="img") as progress:
        picture = tool.run(Setup(pipeline, columns, prompts, list(cfg.seeds), cfg.negative_prompt, sampler, progress))

    save_images(picture, out_dir, tool_name)
    shown = len(picture.rows) if cfg.grid_rows is None else min(len(picture.rows), int(cfg.grid_rows))
    grid = labelled_grid({title: images[:shown] for title, images in picture.columns.items()}, picture.rows[:shown])
    written = {"grid": str(save_grid(grid, out_dir / "grid.png"))}
    if shown < len(picture.rows):
        print(
            f"grid.png shows the first {shown} of {len(picture.rows)} rows (grid_rows={cfg.grid_rows}); every image is in images/"
        )
    sources = {c.name: c.source for c in columns}
    if isinstance(tool, BestOfN):
        sources |= {tool.best_column(c.name): {**c.source, "reranked": f"best of {tool.n}"} for c in columns}
        sources |= {tool.all_column(c.name): {**c.source, "reranked": f"all {tool.n} candidates"} for c in columns}
    named = [Column(name, None, source) for name, source in sources.items()]
    written["manifest"] = str(write_manifest(out_dir, picture.images, named, resolved))
    print(
        f"\n{tool_name}: {len(picture.images)} images in {out_dir / 'images' / tool_name}\n  grid:     {written['grid']}"
    )
    print(f"  manifest: {written['manifest']}")
    if evaluator is not None:
        report = score_columns(evaluator, picture.images)
        settings = {k: resolved.get(k) for k in ("prompts", "num_prompts", "seeds", "metrics", "sampler", "tool")}
        json_path, md_path = write_report(out_dir, report, settings)
        print("\n" + markdown_table(report["columns"]))
        if "gap_closed" in report:
            print("\n" + toyworld_table(report))
        print(f"\nreport: {json_path}\n        {md_path}")
        written["report"] = str(json_path)
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="explore")
def main(cfg: DictConfig) -> None:
    explore(cfg)


if __name__ == "__main__":
    main()
