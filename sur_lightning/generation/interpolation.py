"""Moving through conditioning space (unCLIP, arXiv 2204.06125, §3): per-token slerp, and conditionings that blend
two conditionings or shift one along the difference of two captions.

``slerp(a, b, t)`` interpolates every token vector (the last axis) on the great circle between the two directions
and its length linearly between the two lengths, so each token keeps the norm the model was trained on; the
element-wise arc-cosine of diffusers' community "slerp" example is not this. ``lerp`` is the straight line.

``BlendConditioning`` and ``TextDiffConditioning`` follow the protocol of ``conditioning.ClipConditioning``
(``features`` once per batch, ``output`` at every UNet call), so the per-call hook serves them as it serves the base
and every connector: a timestep-aware connector (ELLA) is blended at every sampling step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sur_lightning.generation.conditioning import ClipConditioning
from sur_lightning.models.connectors import ConnectorOutput, TextFeatures

METHODS = ("slerp", "lerp")


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``(1 - t) a + t b``; ``t`` broadcasts against ``a`` (a scalar, or [B, 1, 1] for per-row weights)."""
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """Norm-preserving spherical interpolation of the vectors on the last axis of ``a`` and ``b`` (same shape).

    The direction moves along the great circle from â to b̂ (angle θ = arccos â·b̂, one angle per vector, not per
    element); the length goes linearly from |a| to |b|, so equal lengths are kept exactly. t = 0 gives ``a`` and
    t = 1 gives ``b``. Nearly parallel vectors (sin θ < eps) fall back to the normalised straight line. ``t``
    broadcasts like ``lerp``'s, with the last axis kept (e.g. [B, 1, 1] for [B, N, d] tokens).
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    a_norm, b_norm = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    a_unit, b_unit = a / a_norm.clamp_min(eps), b / b_norm.clamp_min(eps)
    cos = (a_unit * b_unit).sum(dim=-1, keepdim=True).clamp(-1 + eps, 1 - eps)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    arc = (torch.sin((1 - t) * theta) * a_unit + torch.sin(t * theta) * b_unit) / sin
    straight = F.normalize(lerp(a_unit, b_unit, t), dim=-1, eps=eps)
    direction = torch.where(sin < eps, straight, arc)
    out = direction * lerp(a_norm, b_norm, t)
    # The ends exactly, not up to the arc's rounding.
    out = torch.where(t == 0, a, out)
    return torch.where(t == 1, b, out)


def interpolate(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float, method: str = "slerp") -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return slerp(a, b, t) if method == "slerp" else lerp(a, b, t)


def noise_slerp(a: torch.Tensor, b: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Initial latents [K, C, H, W] from noise ``a`` to noise ``b`` (each [C, H, W]), slerped as one vector each, as
    unCLIP interpolates the DDIM latent: Gaussian noise keeps its expected norm along the path."""
    flat = slerp(a.reshape(1, -1), b.reshape(1, -1), torch.tensor(list(weights), dtype=a.dtype).reshape(-1, 1))
    return flat.reshape(len(weights), *a.shape)


def _check_rows(prompts: Sequence[str], values: torch.Tensor, what: str, name: str) -> None:
    """One prompt per row weight: a conditioning built for a strip renders exactly that strip."""
    if len(prompts) != len(values):
        raise ValueError(f"{what} of {len(values)} {name} renders {len(values)} rows, got {len(prompts)} prompts")


def _row_weights(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row weights [B] shaped to broadcast over ``like`` [B, ...] with its last axis kept."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class BlendFeatures(TextFeatures):
    """Features of both ends of an interpolation, row for row; ``clip``/``pooled`` are the first end's (the hook
    reads the batch size from them). ``weights`` [B]: 0 is the first end, 1 the second."""

    first: TextFeatures | None = None
    second: TextFeatures | None = None
    weights: torch.Tensor | None = None


class BlendConditioning(ClipConditioning):
    """Row i is ``interpolate(first(prompt_i), second(partner(prompt_i)), weights[i])``, token by token, at every
    UNet call; the negative branch blends the two negatives with the same weights.

    first, second: conditionings (the base's or a connector's; the same one to interpolate two prompts).
    weights:       one per row of every batch rendered with this conditioning (a strip: 0 … 1).
    partner:       prompt -> the prompt the second end reads (interpolating two prompts); absent prompts (the empty
                   negative) read themselves.
    Both ends must give the same number of tokens: base (77) and ELLA (64 latents) cannot be blended token by
    token, and that fails here naming both.
    """

    def __init__(
        self,
        first: ClipConditioning,
        second: ClipConditioning,
        weights: Sequence[float],
        partner: Mapping[str, str] | None = None,
        method: str = "slerp",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.first, self.second = first, second
        self.weights = torch.tensor([float(w) for w in weights])
        self.partner = dict(partner or {})
        self.method = method

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> BlendFeatures:
        _check_rows(prompts, self.weights, "a blend", "weights")
        first = self.first.features(prompts)
        second = self.second.features([self.partner.get(p, p) for p in prompts])
        return BlendFeatures(clip=first.clip, pooled=first.pooled, first=first, second=second, weights=self.weights)

    def _mix(self, a: ConnectorOutput, b: ConnectorOutput, weights: torch.Tensor) -> ConnectorOutput:
        if a.conditioning.shape != b.conditioning.shape:
            raise ValueError(
                f"cannot blend {describe(self.first)} ({a.conditioning.shape[1]} tokens) with {describe(self.second)} "
                f"({b.conditioning.shape[1]} tokens) token by token: interpolate two prompts through one of them "
                "instead (between=prompts), or two connectors with the same token count"
            )
        tokens = interpolate(
            a.conditioning, b.conditioning.to(a.conditioning.dtype), _row_weights(weights, a.conditioning), self.method
        )
        pooled = None
        if a.pooled is not None and b.pooled is not None:
            pooled = interpolate(a.pooled, b.pooled.to(a.pooled.dtype), _row_weights(weights, a.pooled), self.method)
        return ConnectorOutput(conditioning=tokens, pooled=pooled)

    def output(self, features: BlendFeatures, timesteps) -> ConnectorOutput:
        a = self.first.output(features.first, timesteps)
        b = self.second.output(features.second, timesteps)
        return self._mix(a, b, features.weights)

    def negative_output(self, features: BlendFeatures, timesteps) -> ConnectorOutput:
        a = self.first.negative_output(features.first, timesteps)
        b = self.second.negative_output(features.second, timesteps)
        return self._mix(a, b, features.weights)

    def describe(self) -> dict:
        return {
            "kind": "blend",
            "method": self.method,
            "first": self.first.describe(),
            "second": self.second.describe(),
        }


@dataclass
class TextDiffFeatures(TextFeatures):
    """The prompt's features (``clip``/``pooled`` are its own) with the source and target captions' features, row
    for row; ``strengths`` [B]."""

    prompt: TextFeatures | None = None
    source: TextFeatures | None = None
    target: TextFeatures | None = None
    strengths: torch.Tensor | None = None


class TextDiffConditioning(ClipConditioning):
    """unCLIP's text diff on a conditioning: row i moves ``c(prompt_i)`` along ``c(target) − c(source)`` by
    ``strengths[i]``, token by token, at every UNet call.

    method="add":   ``c + s · (c(target) − c(source))`` (s = 0 is the prompt's own conditioning).
    method="slerp": as unCLIP, ``slerp(c, d, s)`` with d the difference's direction at c's length, per token
                    (s in [0, 1]; s = 0 is the prompt, s = 1 the difference alone).
    The negative branch is the conditioning's own: the diff moves the prompt, not the unconditional image.
    """

    METHODS = ("add", "slerp")

    def __init__(
        self, conditioning: ClipConditioning, source: str, target: str, strengths: Sequence[float], method: str = "add"
    ) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.conditioning = conditioning
        self.source, self.target = source, target
        self.strengths = torch.tensor([float(s) for s in strengths])
        self.method = method

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> TextDiffFeatures:
        _check_rows(prompts, self.strengths, "a text diff", "strengths")
        prompt = self.conditioning.features(prompts)
        return TextDiffFeatures(
            clip=prompt.clip,
            pooled=prompt.pooled,
            prompt=prompt,
            source=self.conditioning.features([self.source] * len(prompts)),
            target=self.conditioning.features([self.target] * len(prompts)),
            strengths=self.strengths,
        )

    def _shift(self, c: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        strength = _row_weights(self.strengths, c)
        difference = target.to(c.dtype) - source.to(c.dtype)
        if self.method == "add":
            return c + strength * difference
        direction = F.normalize(difference, dim=-1) * c.norm(dim=-1, keepdim=True)
        # Tokens the two captions share (the start token) have no difference to move along: they stay.
        direction = torch.where(difference.norm(dim=-1, keepdim=True) < 1e-6, c, direction)
        return slerp(c, direction, strength)

    def output(self, features: TextDiffFeatures, timesteps) -> ConnectorOutput:
        c = self.conditioning.output(features.prompt, timesteps)
        source = self.conditioning.output(features.source, timesteps)
        target = self.conditioning.output(features.target, timesteps)
        pooled = None
        if c.pooled is not None:
            pooled = self._shift(c.pooled, source.pooled, target.pooled)
        return ConnectorOutput(
            conditioning=self._shift(c.conditioning, source.conditioning, target.conditioning), pooled=pooled
        )

    def negative_output(self, features: TextDiffFeatures, timesteps) -> ConnectorOutput:
        return self.conditioning.negative_output(features.prompt, timesteps)

    def describe(self) -> dict:
        return {
            "kind": "text_diff",
            "source": self.source,
            "target": self.target,
            "method": self.method,
            "of": self.conditioning.describe(),
        }


def describe(conditioning: ClipConditioning) -> str:
    info = conditioning.describe()
    return info.get("kind", "conditioning") if info.get("kind") != "base" else "the base (CLIP)"
