"""Scorers for best-of-N reranking (``generation.tools.BestOfN``) that are not the metric the result is judged by.

On the toy world the programmatic checker (``metrics/shapes.py``) scores the result, so reranking by it would
measure the reranker against itself. Two scorers are held apart from it:

- ``DenoisingScorer`` asks the frozen base model how much better a text explains an image than no text does, the
  idea of diffusion classifiers (Li et al. 2023, arXiv 2303.16203);
- ``ImageTowerScorer`` is an offline CLIP score: the cosine of image and text in the toy world's contrastive image
  tower (``models/image_tower.py``, shipped beside the toy base), the reranker unCLIP used (arXiv 2204.06125, §3).

For real models the CLIP score (``metrics/clip_score.py``) is the usual reranker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from sur_lightning.models.image_tower import ImageTower, pooled_text_states


class DenoisingScorer:
    """``score(images, prompts) -> Tensor [N]``: the frozen UNet's denoising error without text minus with the
    prompt's CLIP states, averaged over ``timesteps`` × ``noise_draws`` (the same noise for every image, so
    candidates are compared on equal terms). Higher: the text explains the image better.

    backbone:     the frozen SD1.x/2.x backbone (SDXL's UNet needs pooled embeddings and time ids: rerank SDXL
                  with the CLIP scorer).
    timesteps:    the noise levels asked (mid-range levels decide colour and layout).
    noise_draws:  noise samples per level; ``seed`` fixes them.
    """

    def __init__(
        self, backbone, timesteps: Sequence[int] = (300, 500, 700), noise_draws: int = 2, seed: int = 0
    ) -> None:
        if getattr(backbone, "pooled_dim", None):
            raise ValueError(
                "DenoisingScorer runs SD1.x/2.x UNets; for SDXL rerank with the CLIP scorer (tool/scorer=clip)"
            )
        self.backbone, self.timesteps, self.noise_draws, self.seed = (
            backbone,
            [int(t) for t in timesteps],
            int(noise_draws),
            int(seed),
        )

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
                target = (
                    noise
                    if backbone.noise_scheduler.config.prediction_type == "epsilon"
                    else (backbone.noise_scheduler.get_velocity(latents, noise, timesteps))
                )
                error = {}
                for name, states in (("text", text), ("empty", empty)):
                    prediction = backbone.predict(noisy, timesteps, states)
                    error[name] = (prediction - target).pow(2).flatten(1).mean(1).cpu()
                gain += error["empty"] - error["text"]
        return gain / (len(self.timesteps) * self.noise_draws)


class ImageTowerScorer:
    """``score(images, prompts) -> Tensor [N]``: cosine in [-1, 1] of each image's and its prompt's embeddings in
    a contrastive image tower's space. Higher: the text describes the image better.

    tower:         an ``ImageTower`` or its folder (the toy world's: ``sur_lightning.toyworld.shipped_image_tower``).
    text_encoder:  a folder in Stable Diffusion's layout whose ``tokenizer/`` and ``text_encoder/`` are the frozen
                   CLIP text encoder the tower was trained against (the toy base: ``toyworld.shipped_base``).

    Images: PIL images or a float tensor [B, 3, H, W] in [0, 1] (as ``CLIPScorer``), resized to the tower's side.
    The toy tower only ever read complex prompts ("two red circles"), so best-of-N should hand it those
    (``tool.scorer_text=complex``): narrative words keep the base text encoder's random embeddings.
    """

    def __init__(self, tower: ImageTower | str, text_encoder: str, device: str = "cpu") -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tower = (tower if isinstance(tower, ImageTower) else ImageTower.from_pretrained(tower)).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(text_encoder, subfolder="tokenizer")
        self.text_encoder = (
            CLIPTextModel.from_pretrained(text_encoder, subfolder="text_encoder", torch_dtype=torch.float32)
            .to(device)
            .eval()
        )
        width, expected = self.text_encoder.config.hidden_size, self.tower.config.text_dim
        if width != expected:
            raise ValueError(
                f"ImageTowerScorer: the text encoder in {text_encoder}/text_encoder is {width} wide, but "
                f"the tower reads {expected}-wide pooled states: give the base the tower was trained on"
            )
        self.device = device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings [B, D]."""
        size = self.tower.config.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
            pixels = images.float()
            if tuple(pixels.shape[-2:]) != (size, size):
                pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        else:
            from torchvision.transforms.functional import to_tensor

            pixels = torch.stack(
                [to_tensor(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in images]
            )
        return self.tower.embed_images(pixels.to(self.device) * 2 - 1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings [B, D]."""
        return self.tower.embed_texts(pooled_text_states(self.text_encoder, self.tokenizer, list(prompts)))

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1).cpu()
