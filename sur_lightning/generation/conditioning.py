"""How a connector conditions the UNet at generation: the per-call conditioning hook.

Built on diffusers' ``StableDiffusionPipeline``; nothing of it is copied. Each column of images comes
from a *conditioning* (``ClipConditioning`` for the base model, ``ConnectorConditioning`` for an
adapter) in two parts: ``features(prompts)`` runs the frozen encoders once per batch (CLIP states,
LLM states), ``apply(features, timesteps)`` maps them to the UNet's ``encoder_hidden_states`` [B,N,d].

``conditioning_hook`` (a forward pre-hook on the UNet) calls ``apply`` with the timestep the UNet is
actually called with, at every call. So a timestep-aware connector (ELLA) is recomputed at every
sampling step, with every scheduler, by the same mechanism that serves SUR (whose output does not
depend on t) and the base model. With classifier-free guidance the pipeline batches the UNet input as
[negative; positive]: the hook conditions the negative (empty) prompts and the positive prompts in
two separate connector calls, so neither sees the other (the released SUR's ``batch_first=False``
would otherwise let them attend to each other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from sur_lightning.models.connectors import ConnectorOutput, TextFeatures

MODES = ("replace", "concat_clip")


NEGATIVES = ("connector", "base")


TextFeaturesFn = Callable[[list[str]], TextFeatures]


def frozen_text_features(backbone, llm: nn.Module | None = None) -> TextFeaturesFn:
    """prompts -> TextFeatures(clip [B,77,d], pooled [B,P] on SDXL, llm/llm_mask from ``llm`` when given), like the
    training module's."""

    def text_features(prompts: list[str]) -> TextFeatures:
        clip, pooled = backbone.encode_text(list(prompts))
        return with_llm_states(clip, pooled, prompts, llm)

    return text_features


def with_llm_states(
    clip: torch.Tensor, pooled: torch.Tensor | None, prompts: Sequence[str], llm: nn.Module | None
) -> TextFeatures:
    """TextFeatures of ``prompts`` from their CLIP states [B,77,d] (and SDXL's pooled [B,P]), plus the LLM's
    states and mask on CLIP's device when ``llm`` is given."""
    if llm is None:
        return TextFeatures(clip=clip, pooled=pooled, prompts=list(prompts))
    states, mask = llm(list(prompts))
    return TextFeatures(
        clip=clip,
        llm=states.to(clip.device),
        llm_mask=None if mask is None else mask.to(clip.device),
        pooled=pooled,
        prompts=list(prompts),
    )


class NonFiniteConditioningError(FloatingPointError):
    """A connector's conditioning holds NaN or inf; the message names the prompts (and the column, in ``generate``)."""


def check_finite_conditioning(
    out: ConnectorOutput, features: TextFeatures, connector: nn.Module, timesteps: torch.Tensor
) -> None:
    """Raise ``NonFiniteConditioningError`` when a row of ``out.conditioning`` [B, N, d] (or SDXL's ``out.pooled``
    [B, P]) is not finite: the UNet would turn it into a black image without any error. Names the prompts of
    those rows (``features.prompts``) and the timestep [B]."""
    bad = ~torch.isfinite(out.conditioning).flatten(1).all(dim=1)  # [B]
    if out.pooled is not None:
        bad |= ~torch.isfinite(out.pooled).flatten(1).all(dim=1)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten().tolist()
    texts = features.prompts
    named = ", ".join(repr(texts[i]) if texts is not None else f"row {i}" for i in rows)
    raise NonFiniteConditioningError(
        f"{type(connector).__name__} gave non-finite conditioning (NaN or inf) for prompt {named} at timestep "
        f"{int(timesteps.reshape(-1)[rows[0]])}: its weights or the features it reads are broken (a diverged "
        "training run?); the UNet would draw a black image from it"
    )


@contextmanager
def override_eta(connector: nn.Module, value: float | None):
    """Within the block, the connector's η module is ``FixedEta(value)`` (SUR); ``None`` changes nothing."""
    if value is None:
        yield connector
        return
    from sur_lightning.models.eta import FixedEta

    if not isinstance(getattr(connector, "eta", None), nn.Module):
        raise TypeError(f"{type(connector).__name__} has no η module to override (η applies to SUR adapters)")
    original = connector.eta
    connector.eta = FixedEta(float(value))
    try:
        yield connector
    finally:
        connector.eta = original


def _batch_timesteps(timesteps: torch.Tensor | float, batch: int, device) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=device)
    return timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(batch)


class ClipConditioning:
    """The base model's conditioning: CLIP states of the prompt, whatever the timestep.

    ``features(prompts) -> TextFeatures`` (frozen encoders, once per batch);
    ``output(features, timesteps [B] or scalar) -> ConnectorOutput`` (tokens [B, N, d]; SDXL: pooled [B, P]);
    ``apply(features, timesteps) -> [B, N, d]``, the tokens alone;
    ``conditioning(prompts, timesteps) -> [B, N, d]`` does both.
    """

    def __init__(self, text_features: TextFeaturesFn) -> None:
        self.text_features = text_features

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> TextFeatures:
        return self.text_features(list(prompts))

    def output(self, features: TextFeatures, timesteps: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(conditioning=features.clip, pooled=features.pooled)

    def negative_output(self, features: TextFeatures, timesteps: torch.Tensor) -> ConnectorOutput:
        """The negative (unconditional) branch under classifier-free guidance."""
        return self.output(features, timesteps)

    def apply(self, features: TextFeatures, timesteps: torch.Tensor) -> torch.Tensor:
        return self.output(features, timesteps).conditioning

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], timesteps: torch.Tensor | float) -> torch.Tensor:
        return self.apply(self.features(prompts), timesteps)

    conditioning = __call__

    def describe(self) -> dict:
        return {"kind": "base"}


class ConnectorConditioning(ClipConditioning):
    """A trained connector's conditioning: ``connector(features, t).conditioning`` [B, N, d].

    mode="replace":     the connector's output alone (SUR: 77 tokens; ELLA: its latents, e.g. 64).
    mode="concat_clip": CLIP states then the connector's output along tokens ("ELLA + CLIP": 77+64).
    eta:                replaces the connector's η by ``FixedEta(eta)`` for these calls (SUR only).
    negative="connector": the negative prompt goes through the connector too (as the SUR authors' pipeline);
    negative="base":    it keeps the base's own CLIP states (for connectors with CLIP's token count, e.g. SUR).
    """

    def __init__(
        self,
        connector: nn.Module,
        text_features: TextFeaturesFn,
        mode: str = "replace",
        eta: float | None = None,
        negative: str = "connector",
    ) -> None:
        super().__init__(text_features)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
        self.negative = negative
        self.connector = connector
        self.mode = mode
        self.eta = eta
        # A connector that ignores the timestep (SUR) runs once per prompt batch, not at every sampling step.
        self.timestep_aware = getattr(connector, "timestep_aware", True)
        self._recent: list[tuple[TextFeatures, ConnectorOutput]] = []

    @torch.no_grad()
    def output(self, features: TextFeatures, timesteps: torch.Tensor | float) -> ConnectorOutput:
        if self.timestep_aware:
            return self._output(features, timesteps)
        # The same features object comes back at every sampling step (prompt and negative; a text diff's source
        # and target too): reuse its output.
        for seen, out in self._recent:
            if seen is features:
                return out
        out = self._output(features, timesteps)
        self._recent = [*self._recent, (features, out)][-4:]
        return out

    def negative_output(self, features: TextFeatures, timesteps: torch.Tensor | float) -> ConnectorOutput:
        if self.negative == "connector":
            return self.output(features, timesteps)
        return ConnectorOutput(conditioning=features.clip, pooled=features.pooled)

    def _output(self, features: TextFeatures, timesteps: torch.Tensor | float) -> ConnectorOutput:
        reference = features.clip if features.clip is not None else features.llm
        timesteps = _batch_timesteps(timesteps, reference.shape[0], reference.device)
        with override_eta(self.connector, self.eta):
            out = self.connector(features, timesteps)
        conditioning = out.conditioning
        if self.mode == "concat_clip":
            conditioning = torch.cat([features.clip.to(conditioning.dtype), conditioning], dim=1)
        # A connector written for SD1.x may return any object with `.conditioning` and no pooled embedding.
        out = ConnectorOutput(conditioning=conditioning, pooled=getattr(out, "pooled", None))
        check_finite_conditioning(out, features, self.connector, timesteps)
        return out

    def describe(self) -> dict:
        return {"kind": type(self.connector).__name__, "mode": self.mode, "eta": self.eta, "negative": self.negative}


class VariantMeanConditioning(ConnectorConditioning):
    """A connector trained with name dropout (ELLA + RAG), read at inference as the mean of its outputs over
    each prompt's K renamed variants: placeholder word k, and with ``rag.vary_wording`` the fact in wording
    k mod W. These are the K inputs training showed the connector for every object; ``rag.anonymise`` alone
    reads variant 0. A test-time average, so that no one placeholder word or wording decides what is drawn.

    ``variant(prompt, k) -> str | None``: the prompt with its object renamed to placeholder k, None when it
    names no object (the LLM's ``rag.renamer.variant``; K is ``rag.renamer.variants``).
    features(prompts) -> TextFeatures: clip [B, 77, d] of the prompts; llm [K·B, T, D] and llm_mask [K·B, T],
    variant-major (rows k·B .. k·B + B - 1 are variant k), from one LLM call so every variant has the same T.
    output(features, t) -> tokens [B, N, d]: the mean over the K variants of the connector's output.
    """

    def __init__(
        self,
        connector: nn.Module,
        text_features: TextFeaturesFn,
        variant: Callable[[str, int], str | None],
        variants: int,
        mode: str = "replace",
        negative: str = "connector",
    ) -> None:
        super().__init__(connector, text_features, mode, None, negative)
        if variants < 1:
            raise ValueError(f"variant_mean needs at least one renamed variant, got {variants}")
        self.variant = variant
        self.variants = variants

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> TextFeatures:
        prompts = list(prompts)
        # Variant 0 is the prompt itself: the retriever anonymises it to variant 0, and its CLIP states are the
        # prompt's own, as without averaging.
        renamed = [self.variant(p, k) or p for k in range(1, self.variants) for p in prompts]
        every = self.text_features(prompts + renamed)
        batch = len(prompts)
        clip = every.clip[:batch] if every.clip is not None else None
        pooled = every.pooled[:batch] if every.pooled is not None else None
        return TextFeatures(clip=clip, llm=every.llm, llm_mask=every.llm_mask, pooled=pooled, prompts=prompts)

    def _output(self, features: TextFeatures, timesteps: torch.Tensor | float) -> ConnectorOutput:
        batch = len(features.prompts)
        outputs = []
        for k in range(self.variants):
            rows = slice(k * batch, (k + 1) * batch)
            one = TextFeatures(
                clip=features.clip,
                llm=features.llm[rows],
                llm_mask=None if features.llm_mask is None else features.llm_mask[rows],
                pooled=features.pooled,
                prompts=features.prompts,
            )
            outputs.append(super()._output(one, timesteps))
        return ConnectorOutput(
            conditioning=torch.stack([o.conditioning for o in outputs]).mean(dim=0), pooled=outputs[0].pooled
        )

    def describe(self) -> dict:
        return {**super().describe(), "variant_mean": self.variants}


def read_connector(
    connector: nn.Module,
    text_features: TextFeaturesFn,
    mode: str = "replace",
    eta: float | None = None,
    negative: str = "connector",
    renamer=None,
) -> ConnectorConditioning:
    """How generation reads a trained connector: directly, or with ``renamer`` (the LLM's ``rag.renamer``, for
    ``variant_mean``) as the mean of its outputs over each prompt's renamed variants. Shared by ``build_columns``
    and the evaluation during training, so both score the same reading."""
    if renamer is not None:
        return VariantMeanConditioning(connector, text_features, renamer.variant, renamer.variants, mode, negative)
    return ConnectorConditioning(connector, text_features, mode, eta, negative)


@contextmanager
def conditioning_hook(unet: nn.Module, conditioning: ClipConditioning, features: TextFeatures, negative: TextFeatures):
    """While active, every call of ``unet`` gets ``encoder_hidden_states`` recomputed by ``conditioning.output``
    at the timestep of that call: rows [negative; positive] under classifier-free guidance (two separate
    connector calls), or the positive rows alone without it. On SDXL the pooled embedding in
    ``added_cond_kwargs["text_embeds"]`` is replaced the same way (the pipeline's ``time_ids`` are kept).
    """
    batch = (features.clip if features.clip is not None else features.llm).shape[0]

    def hook(module, args, kwargs):
        in_kwargs = "encoder_hidden_states" in kwargs
        states = kwargs["encoder_hidden_states"] if in_kwargs else args[2]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        rows = states.shape[0]
        t = torch.as_tensor(timestep, device=states.device).reshape(-1)
        if rows == 2 * batch:
            t_neg, t_pos = (t[:batch], t[batch:]) if t.numel() == rows else (t, t)
            # The prompt's first: a non-finite conditioning then names the user's prompt, not the negative one.
            cond = conditioning.output(features, t_pos)
            uncond = conditioning.negative_output(negative, t_neg)
            if uncond.conditioning.shape[1:] != cond.conditioning.shape[1:]:
                raise ValueError(
                    f"negative={getattr(conditioning, 'negative', '?')}: the negative branch has {uncond.conditioning.shape[1]} "
                    f"tokens and the prompt {cond.conditioning.shape[1]}; negative=base needs a connector with CLIP's token count (SUR)"
                )
            new = torch.cat([uncond.conditioning, cond.conditioning])
            pooled = None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled])
        elif rows == batch:
            out = conditioning.output(features, t)
            new, pooled = out.conditioning, out.pooled
        else:
            raise RuntimeError(f"UNet called with {rows} rows; expected {batch} prompts or {2 * batch} under CFG")
        new = new.to(states.device, states.dtype)
        added = kwargs.get("added_cond_kwargs")
        if pooled is not None:
            if not added or "text_embeds" not in added:
                raise RuntimeError(
                    "the conditioning has a pooled embedding (SDXL) but the UNet call has no added_cond_kwargs"
                )
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled.to(states.device, added["text_embeds"].dtype)}
        if in_kwargs:
            kwargs["encoder_hidden_states"] = new
        else:
            args = (*args[:2], new, *args[3:])
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
