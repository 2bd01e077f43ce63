"""The text a stock ``StableUnCLIPPipeline`` hands its prior, computed as that pipeline computes it.

diffusers' ``StableUnCLIPPipeline`` (``stabilityai/stable-diffusion-2-1-unclip-small``) feeds its ``PriorTransformer``
from a frozen CLIP text tower of its own, the folders ``prior_tokenizer/`` and ``prior_text_encoder/`` (CLIP
ViT-L/14's text side with its projection: D = P = 768). Its ``_encode_prior_prompt`` does::

    prompts -> CLIPTokenizer(padding="max_length", max_length=77, truncation=True)
      -> input_ids [B, 77], attention_mask [B, 77]      (1 on the start token, the words and the end token)
      -> CLIPTextModelWithProjection(input_ids)         (no attention mask: CLIP's causal mask alone)
      -> last_hidden_state [B, 77, D]  the prior's encoder_hidden_states, masked by attention_mask
         text_embeds       [B, P]      the prior's proj_embedding

``StableUnclipPriorText`` returns those three, so a ``DiffusionPrior`` trained on them
(``+experiment=unclip_sd21_clip``) reads in training what the stock pipeline hands it when sampling. The empty
prompt (a dropped caption) is the pipeline's unconditional text for the prior's classifier-free guidance.
"""

from __future__ import annotations

import torch

from sur_lightning.models.backbone import FrozenModule, load_pretrained


class StableUnclipPriorText(FrozenModule):
    """The frozen prior text tower of a ``StableUnCLIPPipeline`` folder (a hub id or a local copy, one code path).

    forward(list[str]) -> (states [B, N, D] ``last_hidden_state``, mask [B, N] bool ``attention_mask``,
                           pooled [B, P] ``text_embeds``), N = the tokenizer's ``model_max_length`` (77)
    """

    def __init__(self, pipeline: str = "stabilityai/stable-diffusion-2-1-unclip-small", revision: str | None = None):
        super().__init__()
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.pipeline = str(pipeline)
        key = "model.text_encoder.pipeline"
        kwargs = {"revision": revision}
        self.tokenizer = load_pretrained(CLIPTokenizer, self.pipeline, key, subfolder="prior_tokenizer", **kwargs)
        self.model = load_pretrained(
            CLIPTextModelWithProjection, self.pipeline, key, subfolder="prior_text_encoder", **kwargs
        )
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        output = self.model(tokens.input_ids.to(self.device))
        return output.last_hidden_state, tokens.attention_mask.bool().to(self.device), output.text_embeds
