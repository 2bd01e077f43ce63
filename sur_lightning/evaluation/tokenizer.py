"""The VQ tokenizer's half of the seed pipeline's evaluation: reconstruction scores on held-out images and 2-D maps
of the code histograms.

    python -m sur_lightning.evaluation.tokenizer --tokenizer outputs/vqvae_toy/runs/<time>/tokenizer \
        --out outputs/tokenizer_eval [--per-split 32] [--seeds 2] [--lpips-weights alexnet-owt-7be5be79.pth]

Held-out images: the toy world's evaluation suite (``toyworld.world.suite``: the three splits, category = split),
each target drawn afresh for every seed with a generator the tokenizer never saw (``draw_example``), so
``held_out_combination`` and ``unseen_object`` images hold combinations the codebook was not fitted on.

- ``reconstruction_metrics``: MSE and PSNR in [0, 1] pixel units, SSIM (torchmetrics), and LPIPS when a distance
  is given. LPIPS needs torchvision's ImageNet backbone (``metrics/diversity.py``); offline without the file the
  report says ``"lpips": null`` with the reason under ``"lpips_skipped"``: it is never faked.
- ``code_histograms``: each image's share of each of the K codes, [N, K]; mapped with PCA and t-SNE through
  ``evaluation/embeddings.py`` (``project``, ``plot_map``: points coloured by the target colour, marked by split).

Writes ``tokenizer_report.json`` (settings, scores per split and overall, the 2-D coordinates) and ``codes_pca.png``
/ ``codes_tsne.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.evaluation.embeddings import PROJECTIONS, plot_map, project

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, G, G], reconstructions [N, 3, R, R] in [-1, 1]) of ``images`` [N, 3, R, R] in [-1, 1]."""
    codes, reconstructions = [], []
    for start in range(0, len(images), batch_size):
        out = tokenizer(images[start : start + batch_size])
        codes.append(out["codes"].cpu())
        reconstructions.append(out["reconstruction"].float().cpu())
    return torch.cat(codes), torch.cat(reconstructions)


@torch.no_grad()
def reconstruction_metrics(
    images: torch.Tensor, reconstructions: torch.Tensor, lpips: Distance | None = None
) -> dict[str, list[float]]:
    """Per image ``{"mse", "psnr", "ssim"}`` (+ ``"lpips"`` with a distance) of ``reconstructions`` against
    ``images``, both [N, 3, R, R] in [-1, 1]; compared in [0, 1] pixel units (PSNR in dB with peak 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    real, fake = (images.float() + 1) / 2, (reconstructions.float().clamp(-1, 1) + 1) / 2
    mse = ((fake - real) ** 2).flatten(1).mean(1)
    ssim = structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none")
    result = {
        "mse": mse.tolist(),
        "psnr": [10 * math.log10(1.0 / max(float(m), 1e-12)) for m in mse],
        "ssim": ssim.tolist(),
    }
    if lpips is not None:
        result["lpips"] = lpips(fake, real).tolist()
    return result


def code_histograms(codes: torch.Tensor, codebook_size: int) -> np.ndarray:
    """codes [N, G, G] (ints in [0, K)) -> [N, K]: each image's share of each code (rows sum to 1)."""
    flat = codes.flatten(1).long()
    counts = torch.zeros(len(flat), codebook_size).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    return (counts / flat.shape[1]).numpy()


def toyworld_images(prompts: Sequence[Prompt], seeds: Sequence[int], size: int = 64) -> tuple[torch.Tensor, list]:
    """One fresh drawing of every prompt's target per seed: (images [N, 3, size, size] in [-1, 1], the N prompts)."""
    from sur_lightning.toyworld.world import draw_example

    images, rows = [], []
    for seed in seeds:
        rng = random.Random(10_000 + seed)  # not the seeds the world's folders were drawn with
        for prompt in prompts:
            image = np.asarray(draw_example(*prompt.target, rng, size), dtype=np.float32)
            images.append(torch.from_numpy(image).permute(2, 0, 1) / 127.5 - 1)
            rows.append(prompt)
    return torch.stack(images), rows


def load_lpips(net_type: str = "alex", backbone_weights: str | None = None) -> tuple[Distance | None, str | None]:
    """(LPIPS distance, None), or (None, the reason) when its backbone weights cannot be loaded offline."""
    from sur_lightning.evaluation.metrics.diversity import lpips_distance

    try:
        return lpips_distance(net_type, backbone_weights), None
    except RuntimeError as error:
        return None, str(error)


def evaluate_tokenizer(
    tokenizer,
    images: torch.Tensor,
    prompts: Sequence[Prompt],
    out: str | Path,
    lpips: Distance | None = None,
    lpips_skipped: str | None = None,
    projections: Sequence[str] = PROJECTIONS,
    batch_size: int = 32,
) -> dict:
    """Score ``tokenizer``'s reconstructions of ``images`` [N, 3, R, R] in [-1, 1] (one ``Prompt`` each, category =
    split) and map their code histograms; write ``tokenizer_report.json`` and the maps into ``out``. Returns the
    report: ``{"overall": {metric: mean}, "splits": {split: {metric: mean}}, "codes_used", "maps", ...}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codes, reconstructions = reconstruct(tokenizer, images, batch_size)
    per_image = reconstruction_metrics(images, reconstructions, lpips)
    splits = list(dict.fromkeys(p.category for p in prompts))
    report: dict = {
        "images": len(images),
        "overall": {name: float(np.mean(values)) for name, values in per_image.items()},
        "splits": {
            split: {
                name: float(np.mean([v for v, p in zip(values, prompts) if p.category == split]))
                for name, values in per_image.items()
            }
            for split in splits
        },
        "codes_used": int(codes.unique().numel()),
        "codebook_size": int(tokenizer.codebook_size),
        "lpips_skipped": lpips_skipped if lpips is None else None,
        "maps": {},
    }
    if lpips is None:
        report["overall"]["lpips"] = None
    histograms = code_histograms(codes, tokenizer.codebook_size)
    for method in projections:
        coords = project(histograms, method)
        title = f"{method.upper()} of code histograms ({len(prompts)} images, K = {tokenizer.codebook_size})"
        plot_map(out / f"codes_{method}.png", coords, ["codes"], prompts, {"codes": "code histogram"}, title)
        report["maps"][method] = [
            {"prompt_id": p.id, "split": p.category, "target": list(p.target or ()), "xy": [float(x), float(y)]}
            for p, (x, y) in zip(prompts, coords)
        ]
    (out / "tokenizer_report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    from sur_lightning.models.vq_tokenizer import LatentVQTokenizer
    from sur_lightning.toyworld.world import suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a saved LatentVQTokenizer folder (<run>/tokenizer)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", default="data/toyworld", help="the toy world's data folder (its suites)")
    parser.add_argument("--per-split", type=int, default=32, help="prompts per split")
    parser.add_argument("--seeds", type=int, default=2, help="drawings per prompt")
    parser.add_argument("--lpips-net", default="alex")
    parser.add_argument("--lpips-weights", default=None, help="torchvision's backbone file for LPIPS (offline)")
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS))
    args = parser.parse_args(argv)
    tokenizer = LatentVQTokenizer.from_pretrained(args.tokenizer)
    prompts = suite(args.world, per_split=args.per_split)
    images, rows = toyworld_images(prompts, range(args.seeds))
    lpips, skipped = load_lpips(args.lpips_net, args.lpips_weights)
    if skipped:
        print(f"LPIPS skipped: {skipped}")
    report = evaluate_tokenizer(tokenizer, images, rows, args.out, lpips, skipped, args.projections)
    for split, scores in {**report["splits"], "all": report["overall"]}.items():
        print(split.ljust(24), "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
    print(f"codes used: {report['codes_used']} of {report['codebook_size']}; maps and report in {args.out}")
    return report


if __name__ == "__main__":
    main()
