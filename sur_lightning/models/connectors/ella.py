"""ELLA's Timestep-Aware Semantic Connector (TSC).

Hu et al., "ELLA: Equip Diffusion Models with LLM for Enhanced Semantic Alignment", arXiv 2403.05135.
Re-implemented from the paper and the names and shapes of the authors' Apache-2.0 ``model.py``
(github TencentQQGYLab/ELLA) so that their ``ella-sd1.5-tsc-t5xl.safetensors`` loads into it.

Data flow (B batch, T tokens, N latents, W = ``dim`` the UNet's cross-attention width)::

    timesteps [B] -> sinusoid [B, 320] -> MLP(320->W, SiLU, W->W)          = t_emb [B, W]
    llm [B, T, llm_dim] -> proj_in                                           = x [B, T, W]
    latents [N, W] + time_aware_linear(SiLU(t_emb))                          -> [B, N, W]
    per block:  latents += MHA(q=ln_1(latents), kv=cat[ln_1(latents), ln_2(x)])
                latents += c_proj(relu(c_fc(ln_ff(latents)))**2)           (W -> 4W -> W)
    conditioning = latents                                                   [B, N, W] (no proj_out)

On SDXL the UNet also reads a pooled embedding [B, P] (``pooled_dim``); the ELLA authors released no SDXL
model, so the two choices in use are offered: ``pooled="clip"`` passes the second CLIP encoder's pooled output
of the prompt through (``features.pooled``; the default: it is what SDXL's UNet was trained on, and the TSC
then has only the tokens to learn), ``pooled="learned"`` computes it from the TSC alone,
LayerNorm → Linear(W → P) of the mean output latent (no CLIP at inference).

Every ``ln_*`` is an AdaLN: LayerNorm(no affine, eps 1e-6)(h) * (1 + scale) + shift, with
[shift, scale] = Linear(SiLU(t_emb)) initialised to zero, so at initialisation it is a plain LayerNorm.
"""

from __future__ import annotations

from collections import OrderedDict
from os import PathLike

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from sur_lightning.models.connectors import ConnectorFiles, ConnectorOutput, TextFeatures


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine whose shift and scale come from the timestep embedding.

    h [B, L, W], t_emb [B, time_embed_dim] -> [B, L, W].
    """

    def __init__(self, width: int, time_embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(time_embed_dim, 2 * width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(t_emb)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(h) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h).square()


class PerceiverAttentionBlock(nn.Module):
    """One resampler block: latents attend to [latents, x], then a squared-ReLU MLP, both AdaLN-normed.

    x [B, T, W], latents [B, N, W], t_emb [B, time_embed_dim], pad [B, N+T] bool (True = not attended)
    -> latents [B, N, W].
    """

    def __init__(self, width: int, num_heads: int, time_embed_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                sq_relu=SquaredReLU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )
        self.ln_1 = AdaLayerNorm(width, time_embed_dim)  # latents, as query and as key/value
        self.ln_2 = AdaLayerNorm(width, time_embed_dim)  # text tokens, as key/value
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)  # before the MLP

    def forward(
        self, x: torch.Tensor, latents: torch.Tensor, t_emb: torch.Tensor, pad: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.ln_1(latents, t_emb)
        kv = torch.cat([q, self.ln_2(x, t_emb)], dim=1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return latents + self.mlp(self.ln_ff(latents, t_emb))


class TimestepAwareSemanticConnector(ConnectorFiles, nn.Module):
    """ELLA's TSC (arXiv 2403.05135): LLM token states and the diffusion timestep -> UNet conditioning.

    Input:  ``features.llm`` [B, T, llm_dim] frozen LLM/T5 token states, ``features.llm_mask`` [B, T] bool
            (True on real tokens, or None = all real), ``timesteps`` [B] (or a scalar, broadcast) integer or
            float diffusion timesteps on the UNet's scale (0..999).
    Output: ``ConnectorOutput.conditioning`` [B, num_latents, dim], the UNet's ``encoder_hidden_states``.

    ``dim`` is the resampler width, which is the UNet's cross-attention width (the official ``width``);
    ``llm_dim`` the width of the text features (the official ``input_dim``). Like every connector it is
    built by ``ConnectorTrainingModule`` from a partial, which fills both in from the loaded models.
    The defaults are the official SD1.5 / flan-t5-xl sizes (66,820,608 parameters).
    ``use_key_padding_mask=True`` keeps the latents from attending pad tokens of ``llm``; ``False`` attends
    them as the official model does (needed to reproduce the released checkpoint exactly).
    Parameters and submodules carry the official names, flattened: see ``load_official_state_dict``.
    """

    # Reads the LLM's token states at inference, and its output changes with the timestep.
    reads_token_states = True
    timestep_aware = True

    def __init__(
        self,
        dim: int = 768,
        llm_dim: int = 2048,
        num_blocks: int = 6,
        num_heads: int = 8,
        num_latents: int = 64,
        time_channels: int = 320,
        time_embed_dim: int = 768,
        use_key_padding_mask: bool = True,
        pooled_dim: int | None = None,
        pooled: str = "clip",
    ) -> None:
        super().__init__()
        if pooled not in ("clip", "learned"):
            raise ValueError(f"connector.pooled must be 'clip' or 'learned' for ELLA, got {pooled!r}")
        if dim % num_heads:
            raise ValueError(f"connector.num_heads={num_heads} must divide the width dim={dim}")
        if llm_dim is None:
            raise ValueError("ELLA needs text token states: configure an `llm` (e.g. llm=flan_t5_xl)")
        self.config = {  # Hydra-instantiable, for save_connector / load_connector
            "_target_": f"{__name__}.{type(self).__name__}",
            "dim": dim,
            "llm_dim": llm_dim,
            "num_blocks": num_blocks,
            "num_heads": num_heads,
            "num_latents": num_latents,
            "time_channels": time_channels,
            "time_embed_dim": time_embed_dim,
            "use_key_padding_mask": use_key_padding_mask,
            "pooled_dim": pooled_dim,
            "pooled": pooled,
        }
        self.use_key_padding_mask = use_key_padding_mask
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, time_embed_dim, act_fn="silu")
        self.latents = nn.Parameter(dim**-0.5 * torch.randn(num_latents, dim))
        self.time_aware_linear = nn.Linear(time_embed_dim, dim)
        self.proj_in = nn.Linear(llm_dim, dim)
        self.blocks = nn.ModuleList(PerceiverAttentionBlock(dim, num_heads, time_embed_dim) for _ in range(num_blocks))
        self.pooled_head = None
        if pooled_dim is not None and pooled == "learned":
            self.pooled_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, pooled_dim))

    @property
    def adapts_pooled(self) -> bool:
        return self.pooled_head is not None

    def forward(self, features: TextFeatures, timesteps: torch.Tensor) -> ConnectorOutput:
        if features.llm is None or features.llm.dim() != 3:
            raise ValueError(
                "ELLA needs LLM token states [B, T, D]: use a T5 (llm=flan_t5_xl) or an LLM with llm.pooling=none"
            )
        dtype = self.latents.dtype
        llm = features.llm.to(dtype)
        batch_size = llm.shape[0]

        t_emb = self.time_embedding(self.time_proj(timesteps.reshape(-1).expand(batch_size)).to(dtype))
        x = self.proj_in(llm)
        latents = self.latents.expand(batch_size, -1, -1) + self.time_aware_linear(F.silu(t_emb)).unsqueeze(1)

        pad = None
        if self.use_key_padding_mask and features.llm_mask is not None:
            latents_pad = torch.zeros(latents.shape[:2], dtype=torch.bool, device=latents.device)
            pad = torch.cat([latents_pad, ~features.llm_mask.bool()], dim=1)
        for block in self.blocks:
            latents = block(x, latents, t_emb, pad)
        pooled = self.pooled_head(latents.mean(dim=1)) if self.pooled_head is not None else features.pooled
        return ConnectorOutput(conditioning=latents, pooled=pooled)


# Official key prefix -> ours, tried in order (first match wins). Everything after the prefix is identical:
# ``connector.perceiver_blocks.{i}.attn.in_proj_weight`` -> ``blocks.{i}.attn.in_proj_weight`` etc.
# The official ``position`` (sinusoid, our ``time_proj``) has no parameters.
OFFICIAL_KEY_PREFIXES = (
    ("connector.perceiver_blocks.", "blocks."),
    ("connector.", ""),  # latents, time_aware_linear.{weight,bias}, proj_in.{weight,bias}
    ("time_embedding.", "time_embedding."),  # linear_1, linear_2: diffusers' TimestepEmbedding in both
)


def official_key_to_ours(key: str) -> str:
    for official, ours in OFFICIAL_KEY_PREFIXES:
        if key.startswith(official):
            return ours + key[len(official) :]
    raise KeyError(f"not a key of the official ELLA model: {key}")


def load_official_state_dict(
    module: TimestepAwareSemanticConnector, state_dict: dict[str, torch.Tensor] | str | PathLike
) -> TimestepAwareSemanticConnector:
    """Load the authors' weights (e.g. ``ella-sd1.5-tsc-t5xl.safetensors``, a path or a state dict) strictly.

    To reproduce the released model exactly, build ``module`` with ``use_key_padding_mask=False``.
    """
    if not isinstance(state_dict, dict):
        from sur_lightning.models.weights import read_safetensors

        state_dict = read_safetensors(state_dict)
    module.load_state_dict({official_key_to_ours(k): v for k, v in state_dict.items()}, strict=True)
    return module
