"""η: how much of the adapter's output is mixed back into the CLIP embedding, c' = η·g + (1−η)·V.

Every η module maps the pooled text embedding [B, d] to one weight per prompt [B] in (0, 1):
  FixedEta       a constant (SUR's η=0.1)
  LearnableEta   one trained scalar, kept in (0, 1) through a sigmoid
  AdaptiveEta    a small MLP on the pooled embedding, so each prompt gets its own η
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"eta init must lie in (0, 1), got {p}")
    return math.log(p / (1.0 - p))


class FixedEta(nn.Module):
    """A constant η. pooled [B, d] -> [B]."""

    def __init__(self, value: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"eta.value must lie in [0, 1], got {value}")
        self.value = value
        self.config = {"_target_": f"{__name__}.FixedEta", "value": value}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.new_full((pooled.shape[0],), self.value)


class LearnableEta(nn.Module):
    """One trained η = sigmoid(logit), starting at ``init``. pooled [B, d] -> [B]."""

    def __init__(self, init: float = 0.1) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(_logit(init)))
        self.config = {"_target_": f"{__name__}.LearnableEta", "init": init}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit).expand(pooled.shape[0]).to(pooled.dtype)


class AdaptiveEta(nn.Module):
    """Per-prompt η = sigmoid(MLP(pooled)), starting near ``init``. pooled [B, dim] -> [B].

    ``dim`` is filled in by the connector (the CLIP width) when left as None.
    """

    def __init__(self, dim: int | None = None, hidden: int = 64, init: float = 0.1) -> None:
        super().__init__()
        self.hidden = hidden
        self.init = init
        self.dim = dim
        self.mlp: nn.Sequential | None = None
        if dim is not None:
            self.build(dim)

    def build(self, dim: int) -> None:
        self.dim = dim
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, self.hidden), nn.SiLU(), nn.Linear(self.hidden, 1))
        # Start every prompt near ``init`` (like SUR's fixed η) but not identical, so gradients
        # reach the first layer from step one.
        nn.init.normal_(self.mlp[-1].weight, std=0.01)
        nn.init.constant_(self.mlp[-1].bias, _logit(self.init))

    @property
    def config(self) -> dict:
        return {"_target_": f"{__name__}.AdaptiveEta", "dim": self.dim, "hidden": self.hidden, "init": self.init}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            raise RuntimeError("AdaptiveEta needs its input width: pass dim= or let the connector build it")
        return torch.sigmoid(self.mlp(pooled)).squeeze(-1)
