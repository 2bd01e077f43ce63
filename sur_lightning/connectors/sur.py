"""SUR-adapter (Zhong et al., "SUR-adapter: Enhancing Text-to-Image Pre-trained Diffusion Models with
Large Language Models", arXiv 2305.05189), as in the authors' released module, with its defects as switches.

    V   = CLIP(simple prompt)                      [B, 77, d]
    E   = TransformerEncoder(V)                    [B, 77, d]   2 layers, 8 heads, ff 2048
    w   = softmax(q(E) k(V)^T / sqrt(d)) V + V     [B, 77, d]
    o   = MLP(w) + w                               [B, 77, d]
    c'  = η · fc(o) + (1 − η) · V                  [B, 77, d]   fc's weight starts at zero
    W0·h_LLM                                       [B, d]       the LLM state projected for distillation

``batch_first=False`` reproduces the released code, whose encoder attends over the batch axis.
``train_llm_projection=False`` reproduces its frozen random W0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sur_lightning.connectors import ConnectorOutput, TextFeatures


class SURAdapter(nn.Module):
    """forward(TextFeatures(clip [B,77,d], llm [B,D] pooled), timesteps ignored) -> ConnectorOutput:
    conditioning [B,77,d], eta [B], internals {"encoder": [B,77,d], "llm_projected": [B,d] (when llm given)}.
    """

    def __init__(
        self,
        dim: int,
        llm_dim: int,
        eta: nn.Module,
        num_layers: int = 2,
        num_heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
        batch_first: bool = True,
        zero_init_output: bool = True,
        train_llm_projection: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"connector.num_heads={num_heads} must divide the CLIP width {dim}")
        self.dim = dim
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.fc = nn.Linear(dim, dim)
        if zero_init_output:
            nn.init.zeros_(self.fc.weight)
        if hasattr(eta, "build") and getattr(eta, "mlp", None) is None:
            eta.build(dim)
        self.eta = eta
        self.llm_projection = nn.Linear(llm_dim, dim)
        self.llm_projection.requires_grad_(train_llm_projection)
        self.config = {
            "_target_": f"{__name__}.SURAdapter",
            "dim": dim,
            "llm_dim": llm_dim,
            "eta": eta.config,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "ff_dim": ff_dim,
            "dropout": dropout,
            "batch_first": batch_first,
            "zero_init_output": zero_init_output,
            "train_llm_projection": train_llm_projection,
        }

    def forward(self, features: TextFeatures, timesteps: torch.Tensor | None = None) -> ConnectorOutput:
        clip = features.clip
        encoded = self.encoder(clip)
        scores = self.query(encoded) @ self.key(clip).transpose(-2, -1) / math.sqrt(self.dim)
        weighted = scores.softmax(dim=-1) @ clip + clip
        out = self.mlp(weighted) + weighted
        eta = self.eta(clip.mean(dim=1))
        conditioning = eta[:, None, None] * self.fc(out) + (1.0 - eta[:, None, None]) * clip
        internals = {"encoder": encoded}
        if features.llm is not None:
            internals["llm_projected"] = self.llm_projection(features.llm)
        return ConnectorOutput(conditioning=conditioning, eta=eta, internals=internals)
