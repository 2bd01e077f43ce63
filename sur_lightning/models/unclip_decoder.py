"""unCLIP's decoder conditioning: an image embedding -> extra context tokens and a time-embedding offset for a frozen UNet.

Ramesh et al., "Hierarchical Text-Conditional Image Generation with CLIP Latents" (DALL·E 2 / unCLIP), arXiv
2204.06125, §2.1, following GLIDE (arXiv 2112.10741): the decoder is conditioned on the CLIP image embedding by
"projecting and adding CLIP embeddings to the existing timestep embedding, and by projecting CLIP embeddings into
four extra tokens of context"; the embedding is set to zero 10 % of the time for classifier-free guidance.
diffusers' ``UnCLIPTextProjModel`` does the same for Karlo. Here the UNet is the frozen toy base (or any SD UNet):
only this projection is trained, and the UNet reads its tokens as its whole cross-attention context (no caption).

Shapes (B batch, E ``embedding_dim``, K ``num_tokens``, d ``cross_attention_dim``, T ``time_embed_dim``)::

    image_embeds [B, E]   the image tower's embedding (zeros: the unconditional, dropped embedding)
      -> MLP -> [B, K, d] -> LayerNorm             context tokens   (the UNet's encoder_hidden_states)
      -> Linear (zero-initialised) -> [B, T]       added to the UNet's time embedding (``added_time_embedding``)

``added_time_embedding(unet, offset)`` is the context in which every call of ``unet`` adds ``offset`` [B, T]
(or [2B, T] under classifier-free guidance, unconditional rows first) to the output of ``unet.time_embedding``;
gradients flow through it to the projection. Save and load with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ImageEmbeddingProjection(ModelMixin, ConfigMixin):
    """The trained half of unCLIP's decoder: image embedding -> (context tokens [B, K, d], time offset [B, T]).

    embedding_dim:       width of the image embedding (the toy image tower: 128).
    cross_attention_dim: the UNet's ``cross_attention_dim`` (the toy base: 128).
    time_embed_dim:      width of the UNet's time embedding (``unet.time_embedding.linear_2.out_features``).
    num_tokens:          extra context tokens (unCLIP: 4).
    hidden_dim:          width of the token MLP's hidden layer.
    """

    @register_to_config
    def __init__(
        self,
        embedding_dim: int = 128,
        cross_attention_dim: int = 128,
        time_embed_dim: int = 128,
        num_tokens: int = 4,
        hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        self.to_tokens = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_tokens * cross_attention_dim)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.to_time = nn.Linear(embedding_dim, time_embed_dim)
        # Zero at the start: the UNet's time embedding is untouched until the projection has learned something.
        nn.init.zeros_(self.to_time.weight)
        nn.init.zeros_(self.to_time.bias)

    def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, E] -> (context tokens [B, K, d], time-embedding offset [B, T])."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.embedding_dim:
            raise ValueError(
                f"ImageEmbeddingProjection: expected image embeddings [B, {self.config.embedding_dim}], "
                f"got {tuple(image_embeds.shape)}"
            )
        embeds = image_embeds.to(self.dtype)
        tokens = self.to_tokens(embeds).view(len(embeds), self.config.num_tokens, self.config.cross_attention_dim)
        return self.norm(tokens), self.to_time(embeds)

    @staticmethod
    def widths_of(unet) -> dict[str, int]:
        """The constructor's UNet widths read from a diffusers ``UNet2DConditionModel``."""
        return {
            "cross_attention_dim": int(unet.config.cross_attention_dim),
            "time_embed_dim": int(unet.time_embedding.linear_2.out_features),
        }


@contextmanager
def added_time_embedding(unet, offset: torch.Tensor):
    """While active, ``unet.time_embedding``'s output [R, T] gets ``offset`` added: [R, T] as it is, or [B, T]
    repeated when the UNet is called with R = 2B rows (classifier-free guidance with the same embeddings twice).
    For [unconditional; conditional] rows pass the [2B, T] offset of [zeros; embeddings]."""

    def hook(module, args, output):
        rows = output.shape[0]
        extra = offset if offset.shape[0] == rows else offset.repeat(rows // offset.shape[0], 1)
        if extra.shape[0] != rows:
            raise RuntimeError(
                f"added_time_embedding: the UNet was called with {rows} rows, the offset has {offset.shape[0]}"
            )
        return output + extra.to(output.device, output.dtype)

    handle = unet.time_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
