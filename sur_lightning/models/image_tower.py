"""A small CLIP-style image tower: images and texts mapped into one embedding space, trained contrastively.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), arXiv 2103.00020,
at toy scale: the image side is a small CNN, the text side is a frozen text encoder's pooled state (the toy base's
CLIP text encoder) through a learned linear head. Both sides are L2-normalised; their cosine, times a learned
temperature, is the logit of the symmetric InfoNCE loss (``contrastive_loss``). unCLIP (arXiv 2204.06125) uses
this space twice: its prior predicts the image embedding from text, its decoder draws an image from it; and the
cosine of an image with a prompt is an offline CLIP score for best-of-N reranking.

Shapes (B batch, H = W = ``image_size``, P ``text_dim``, D ``embedding_dim``, C ``channels[-1]``)::

    pixels       [B, 3, H, W] in [-1, 1]
      -> 4 x [Conv 3x3 stride 2 -> GroupNorm -> SiLU]   (64 px -> 4 px with four stages)
      -> global average pooling [B, C] -> Linear -> image embedding [B, D], unit length
    text_pooled  [B, P]  the frozen text encoder's pooled state (CLIP: the final-norm state at the end token)
      -> Linear -> text embedding [B, D], unit length

``pooled_text_states`` computes ``text_pooled`` from a CLIP tokenizer and text encoder. Save and load with
``save_pretrained`` / ``from_pretrained`` (``config.json`` + safetensors weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ImageTower(ModelMixin, ConfigMixin):
    """The image encoder, the text head and the temperature of a contrastive image–text space.

    channels:       output channels of the stride-2 convolutions (one stage each: four stages take 64 px to 4 px).
    text_dim:       width of the frozen text encoder's pooled state (the toy CLIP: 128).
    embedding_dim:  width of the shared space.
    image_size:     the side the tower is trained on; ``embed_images`` refuses other sizes (resize first).
    init_temperature: the starting softmax temperature; CLIP starts at 0.07 and learns log(1/τ).
    """

    @register_to_config
    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 128),
        text_dim: int = 128,
        embedding_dim: int = 128,
        image_size: int = 64,
        groups: int = 8,
        init_temperature: float = 0.07,
    ) -> None:
        super().__init__()
        stages, width = [], 3
        for out in channels:
            stages += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(groups, out), nn.SiLU()]
            width = out
        self.encoder = nn.Sequential(*stages)
        self.image_head = nn.Linear(width, embedding_dim)
        self.text_head = nn.Linear(text_dim, embedding_dim)
        # CLIP learns the logit scale as log(1/τ) and caps it at 100 so the loss cannot collapse by sharpening.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> unit-length image embeddings [B, D]."""
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"ImageTower: expected pixels [B, 3, {size}, {size}], got {tuple(pixels.shape)}")
        features = self.encoder(pixels.to(self.dtype)).mean(dim=(2, 3))
        return F.normalize(self.image_head(features), dim=-1)

    def embed_texts(self, text_pooled: torch.Tensor) -> torch.Tensor:
        """text_pooled [B, P] -> unit-length text embeddings [B, D]."""
        return F.normalize(self.text_head(text_pooled.to(self.dtype)), dim=-1)

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as CLIP does."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def contrastive_loss(self, pixels: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric InfoNCE over a batch of B matching (image, text) pairs: row i's text is image i's.

        Every other row is a negative, so a batch must not hold two rows of the same text (they would be
        counted as negatives of each other). Returns the mean of the image->text and text->image cross-entropies.
        """
        logits = self.temperature_scale() * self.embed_images(pixels) @ self.embed_texts(text_pooled).T
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def pooled_text_states(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """[B, P]: a CLIP text encoder's pooled output (the final-norm state at the end token) for each prompt."""
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device)).pooler_output.float()


class ClipVisionTower(nn.Module):
    """A frozen CLIP vision model with projection (transformers' ``CLIPVisionModelWithProjection``) read like an
    ``ImageTower``: the image-embedding space of diffusers' ``StableUnCLIPPipeline`` (CLIP ViT-L/14,
    ``openai/clip-vit-large-patch14``: D = 768), whose decoder draws from ``image_embeds``.

        pixels [B, 3, H, W] in [-1, 1] -> resized (bicubic) to the model's side, CLIP-normalised
          -> CLIPVisionModelWithProjection -> image_embeds [B, D] (not normalised: what the stock decoder reads)

    ``config.embedding_dim`` and ``config.image_size`` answer as ``ImageTower``'s do. ``folder``: a hub id or a
    local folder (the key ``conf/model/unclip_prior.yaml`` gives the toy tower's folder).
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: str = "openai/clip-vit-large-patch14", subfolder: str | None = None) -> None:
        from types import SimpleNamespace

        from transformers import CLIPVisionModelWithProjection

        super().__init__()
        kwargs = {"subfolder": subfolder} if subfolder else {}
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder), **kwargs).eval()
        self.model.requires_grad_(False)
        self.pretrained = str(folder)
        self.config = SimpleNamespace(
            embedding_dim=int(self.model.config.projection_dim), image_size=int(self.model.config.image_size)
        )
        self.register_buffer("mean", torch.tensor(self.MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).reshape(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> CLIP image embeddings [B, D]."""
        size = self.config.image_size
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False)
        pixels = ((pixels.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        return self.model(pixel_values=pixels.to(self.model.dtype)).image_embeds.float()
