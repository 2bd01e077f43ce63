"""Does the VQ tokenizer pass the checker gate? Fit a ``LatentVQTokenizer`` codebook on fresh toy-world images over
the shipped base's frozen VAE, then read reconstructions of other fresh images with the checker, beside the
plain VAE's reconstructions of the same images (the ceiling the gate compares with).

    python experiments/vq_tokenizer/gate.py --out outputs/vq_tokenizer            # K=256, 20 batches of 64
    python experiments/vq_tokenizer/gate.py --codebook-size 64 --steps 10 --eval 100

Prints and writes ``gate.json`` in ``--out`` (with the fitted tokenizer in ``--out/tokenizer``): for the VQ and the
VAE reconstructions, the checker's colour, shape, count, exact and valid rates, and MSE, PSNR and SSIM against
the drawn images (torchmetrics, images in [0, 1]); the codes used and the fitting and encoding times.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from sur_lightning.data.datasets import preprocess
from sur_lightning.evaluation.metrics.shapes import check
from sur_lightning.models.vq_tokenizer import LatentVQTokenizer
from sur_lightning.toyworld import shipped_base
from sur_lightning.toyworld.world import random_complex_example


def world_images(n: int, rng: random.Random) -> tuple[torch.Tensor, list[tuple[int, str, str]]]:
    """n fresh world images [n, 3, 64, 64] in [-1, 1] and their (count, colour, shape) targets."""
    drawn = [random_complex_example(rng) for _ in range(n)]
    return torch.stack([preprocess(image, 64, True, False) for image, _, _ in drawn]), [t for _, _, t in drawn]


def reading(reconstructions: torch.Tensor, originals: torch.Tensor, targets) -> dict[str, float]:
    """The checker's rates and the pixel metrics of reconstructions [N, 3, R, R] in [-1, 1]."""
    images, reference = (reconstructions + 1) / 2, (originals + 1) / 2
    results = [check(image, target=target) for image, target in zip(images, targets)]
    rates = {key: sum(r[key] for r in results) / len(results) for key in ("color", "shape", "count", "exact", "valid")}
    mse = torch.mean((images - reference) ** 2).item()
    psnr = PeakSignalNoiseRatio(data_range=1.0)(images, reference).item()
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(images, reference).item()
    return {**rates, "mse": mse, "psnr": psnr, "ssim": ssim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/vq_tokenizer")
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="training batches (the first fits k-means)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval", type=int, default=300, help="fresh images read by the checker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    fit_rng, eval_rng = random.Random(f"fit-{args.seed}"), random.Random(f"eval-{args.seed}")

    tokenizer = LatentVQTokenizer(shipped_base(), codebook_size=args.codebook_size).train()
    start = time.perf_counter()
    for _ in range(args.steps):
        tokenizer(world_images(args.batch_size, fit_rng)[0], reconstruct=False)
    fit_s = time.perf_counter() - start
    tokenizer.eval()

    originals, targets = world_images(args.eval, eval_rng)
    start = time.perf_counter()
    codes = torch.cat([tokenizer.encode(chunk) for chunk in originals.split(100)])
    encode_s = time.perf_counter() - start
    vq = torch.cat([tokenizer.decode(chunk) for chunk in codes.split(100)])
    vae = torch.cat([tokenizer.decode_latents(tokenizer.encode_latents(chunk)) for chunk in originals.split(100)])
    result = {
        "settings": vars(args),
        "grid": list(codes.shape[1:]),
        "codes_used": int(codes.unique().numel()),
        "fit_seconds": round(fit_s, 1),
        "encode_seconds_per_image": round(encode_s / args.eval, 4),
        "vq": reading(vq, originals, targets),
        "vae": reading(vae, originals, targets),
    }
    out = Path(args.out)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "gate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
