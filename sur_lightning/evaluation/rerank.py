"""Scorers for best-of-N reranking (``generation.tools.BestOfN``) that are not the metric the result is judged by.

On the toy world the programmatic checker (``metrics/shapes.py``) scores the result, so reranking by it would
measure the reranker against itself. ``DenoisingScorer`` is held apart from it: it asks the frozen base model how
much better a text explains an image than no text does, the idea of diffusion classifiers (Li et al. 2023,
arXiv 2303.16203). For real models the CLIP score (``metrics/clip_score.py``) is the usual reranker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


class DenoisingScorer:
    """``score(images, prompts) -> Tensor [N]``: the frozen UNet's denoising error without text minus with the
    prompt's CLIP states, averaged over ``timesteps`` × ``noise_draws`` (the same noise for every image, so
    candidates are compared on equal terms). Higher: the text explains the image better.

    backbone:     the frozen SD1.x/2.x backbone (SDXL's UNet needs pooled embeddings and time ids: rerank SDXL
                  with the CLIP scorer).
    timesteps:    the noise levels asked (mid-range levels decide colour and layout).
    noise_draws:  noise samples per level; ``seed`` fixes them.
    """

    def __init__(self, backbone, timesteps: Sequence[int] = (300, 500, 700), noise_draws: int = 2, seed: int = 0) -> None:
        if getattr(backbone, "pooled_dim", None):
            raise ValueError("DenoisingScorer runs SD1.x/2.x UNets; for SDXL rerank with the CLIP scorer (tool/scorer=clip)")
        self.backbone, self.timesteps, self.noise_draws, self.seed = backbone, [int(t) for t in timesteps], int(noise_draws), int(seed)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        from torchvision.transforms.functional import to_tensor

        backbone = self.backbone
        size = backbone.unet.config.sample_size * 2 ** (len(backbone.vae.config.block_out_channels) - 1)
        pixels = torch.stack([to_tensor(image.convert("RGB").resize((size, size))) for image in images]) * 2 - 1
        latents = backbone.scale_latents(backbone.encode_images(pixels).mode())
        text, _ = backbone.encode_text(list(prompts))
        empty, _ = backbone.encode_text([""] * len(prompts))
        generator = torch.Generator().manual_seed(self.seed)
        gain = torch.zeros(len(images))
        for t in self.timesteps:
            for _ in range(self.noise_draws):
                noise = torch.randn(latents.shape[1:], generator=generator).expand_as(latents).to(latents.device)
                timesteps = torch.full((len(images),), t, device=latents.device, dtype=torch.long)
                noisy = backbone.noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if backbone.noise_scheduler.config.prediction_type == "epsilon" else (
                    backbone.noise_scheduler.get_velocity(latents, noise, timesteps))
                error = {}
                for name, states in (("text", text), ("empty", empty)):
                    prediction = backbone.predict(noisy, timesteps, states)
                    error[name] = (prediction - target).pow(2).flatten(1).mean(1).cpu()
                gain += error["empty"] - error["text"]
        return gain / (len(self.timesteps) * self.noise_draws)
