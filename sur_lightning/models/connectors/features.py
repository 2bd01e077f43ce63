"""What every connector reads and returns: ``TextFeatures`` in, ``ConnectorOutput`` out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TextFeatures:
    """Frozen text features of one batch of prompts.

    clip:        [B, 77, d]  CLIP text-encoder states of the (simple) prompt.
    llm:         [B, D] pooled LLM state, or [B, T, D] token states (ELLA), or {teacher: [B, D_teacher]}
                 (``llm=multi``), or None.
    llm_mask:    [B, T] bool, True on real tokens (None when ``llm`` is pooled).
    pooled:      [B, P] SDXL's pooled text embedding of the prompt (the second CLIP encoder's ``text_embeds``),
                 None for SD1.x/2.x backbones.
    prompts:     the B texts these are features of, where generation knows them (so an error can name the
                 prompt), else None.
    """

    clip: torch.Tensor | None = None
    llm: torch.Tensor | None = None
    llm_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    prompts: list[str] | None = None


@dataclass
class ConnectorOutput:
    """What a connector returns.

    conditioning: [B, N, d] the UNet's ``encoder_hidden_states`` (SUR: N=77, ELLA: N=64).
    eta:          [B] the mixing weight used per prompt (SUR), else None.
    internals:    named intermediate tensors the auxiliary losses read
                  (SUR: ``encoder`` [B,77,d] transformer-encoder output, ``llm_projected`` [B,d]).
    pooled:       [B, P] the SDXL UNet's ``added_cond_kwargs["text_embeds"]`` (None for SD1.x/2.x).
    """

    conditioning: torch.Tensor
    pooled: torch.Tensor | None = None
    eta: torch.Tensor | None = None
    internals: dict[str, torch.Tensor] = field(default_factory=dict)
