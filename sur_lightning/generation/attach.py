"""A trained connector inside an unmodified diffusers pipeline, the way people already generate::

    import sur_lightning
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    connector = sur_lightning.load_connector("outputs/demo/runs/<time>/adapter")
    with sur_lightning.attach(pipe, connector):
        image = pipe("a cat is chasing a mouse", generator=torch.Generator().manual_seed(0)).images[0]

``attach`` replaces the pipeline's ``encode_prompt`` (on this instance, for the ``with`` block only), so every
prompt the pipeline encodes goes through the connector:

- **SUR** (its output does not depend on the timestep): the connector's output *is* what ``encode_prompt``
  returns: ``prompt_embeds`` / ``negative_prompt_embeds`` and, on SDXL, the pooled embeddings.
- **ELLA** (timestep-aware): ``encode_prompt`` keeps the pipeline's own CLIP embeddings, and a forward pre-hook
  on the UNet recomputes ``encoder_hidden_states`` (and SDXL's pooled ``text_embeds``) at the timestep of each
  UNet call: ``conditioning.conditioning_hook``, the mechanism ``python -m sur_lightning.generate`` uses.

Both read the CLIP states from the pipeline's own ``encode_prompt``, which is what the project's backbones compute
(tests/generation/test_attach.py checks that the images equal ``generate``'s, same seeds). The negative prompt goes through
the connector too (``negative="connector"``, as ``generate``), with ``""`` when none is given.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from sur_lightning.generation.conditioning import ConnectorConditioning, conditioning_hook, with_llm_states
from sur_lightning.models.connectors import ConnectorOutput, TextFeatures, check_widths


def llm_for(connector: nn.Module) -> nn.Module:
    """The LLM a connector folder recorded (``trained_with.llm.config``), built with token states (ELLA)."""
    from omegaconf.errors import OmegaConfBaseException

    from sur_lightning.generation.columns import token_llm

    record = getattr(connector, "trained_with", None) or {}
    node = (record.get("llm") or {}).get("config")
    hint = (
        "pass attach(..., llm=<the LLM it was trained with>), e.g. "
        "sur_lightning.models.llm.CausalLMFeatures(pretrained=..., pooling='none')"
    )
    if node is None:
        raise ValueError(f"{type(connector).__name__} reads LLM token states but its files record no LLM: {hint}")
    try:
        return token_llm(node)
    except OmegaConfBaseException as error:
        # An adapter file from before its header held the record, in a run whose config no longer resolves.
        raise ValueError(
            f"the LLM recorded for this {type(connector).__name__} ({record['llm'].get('id')}) has config values that "
            f"do not resolve outside its training run ({type(error).__name__}: {error}): {hint}"
        ) from error


def repeat_rows(features: TextFeatures, times: int) -> TextFeatures:
    """Every row ``times`` times in a row (the pipeline's ``num_images_per_prompt`` layout)."""
    if times == 1:
        return features

    def repeat(value):
        if isinstance(value, dict):
            return {name: repeat(v) for name, v in value.items()}
        return None if value is None else value.repeat_interleave(times, dim=0)

    prompts = None if features.prompts is None else [text for text in features.prompts for _ in range(times)]
    return TextFeatures(
        clip=repeat(features.clip),
        llm=repeat(features.llm),
        llm_mask=repeat(features.llm_mask),
        pooled=repeat(features.pooled),
        prompts=prompts,
    )


def clip_output(features: TextFeatures | None) -> ConnectorOutput | None:
    return None if features is None else ConnectorOutput(conditioning=features.clip, pooled=features.pooled)


def pipeline_embeds(out: ConnectorOutput, negative: ConnectorOutput | None, dtype: torch.dtype, xl: bool) -> tuple:
    """What the pipeline's ``encode_prompt`` returns: (prompt, negative) embeds, and on SDXL the pooled pair too."""

    def cast(value):
        return None if value is None else value.to(dtype)

    embeds = cast(out.conditioning), cast(negative and negative.conditioning)
    return (*embeds, cast(out.pooled), cast(negative and negative.pooled)) if xl else embeds


def prompt_list(prompt, name: str) -> list[str]:
    if prompt is None:
        raise ValueError(
            f"sur_lightning.attach: the pipeline was called without {name} text; the connector needs the text itself "
            "(pass prompt=..., not prompt_embeds=...)"
        )
    return [prompt] if isinstance(prompt, str) else list(prompt)


@contextmanager
def attach(
    pipe,
    connector: nn.Module,
    llm: nn.Module | None = None,
    mode: str = "replace",
    negative: str = "connector",
    eta: float | None = None,
):
    """Within the block, ``pipe`` (a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, as diffusers
    ships it) is conditioned by ``connector``.

    ``llm``: the frozen LLM for a connector that reads token states (ELLA); None builds the one the connector's
    folder recorded. SUR reads CLIP's states only at inference and needs none. ``mode``, ``negative``, ``eta``:
    as in ``generate`` (``conditioning.ConnectorConditioning``). The connector moves to the UNet's device.
    """
    from sur_lightning.generation.columns import needs_llm

    xl = hasattr(pipe, "text_encoder_2")
    width = pipe.unet.config.cross_attention_dim
    check_widths(
        getattr(connector, "config", {}),
        type(connector).__name__,
        dim=width,
        dim_source=f"this {type(pipe).__name__}'s UNet",
    )
    device = pipe.unet.device
    connector = connector.to(device).eval()
    if needs_llm(connector):
        llm = (llm if llm is not None else llm_for(connector)).to(device)
    else:
        llm = None
    conditioning = ConnectorConditioning(connector, None, mode, eta, negative)
    original = pipe.encode_prompt
    hooks = ExitStack()

    def features(texts: list[str], clip: torch.Tensor, pooled: torch.Tensor | None) -> TextFeatures:
        # The connector runs in float32 whatever the pipeline's dtype, as in training.
        return with_llm_states(clip.float(), None if pooled is None else pooled.float(), texts, llm)

    def encode_prompt(prompt=None, *args, **kwargs):
        # SD: (prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt, ...)
        # SDXL: (prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt, ...)
        names = ["prompt_2", "device"] if xl else ["device"]
        names += ["num_images_per_prompt", "do_classifier_free_guidance", "negative_prompt"]
        kwargs |= dict(zip(names, args))
        texts = prompt_list(prompt, "prompt")
        cfg = kwargs.get("do_classifier_free_guidance", True)
        per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
        negative_prompt = kwargs.get("negative_prompt")
        negative_texts = (
            [""] * len(texts) if negative_prompt is None else prompt_list(negative_prompt, "negative_prompt")
        )
        if len(negative_texts) == 1 and len(texts) > 1:
            negative_texts = negative_texts * len(texts)
        # The pipeline's own CLIP embeddings, one row per prompt; an empty negative prompt is encoded, not zeroed,
        # as the project's generation does.
        if isinstance(kwargs.get("prompt_2"), str):
            kwargs["prompt_2"] = [kwargs["prompt_2"]] * len(texts)
        stock = original(texts, **{**kwargs, "num_images_per_prompt": 1, "negative_prompt": negative_texts})
        positive_clip, negative_clip = stock[0], stock[1]
        positive_pooled, negative_pooled = (stock[2], stock[3]) if xl else (None, None)
        positive = repeat_rows(features(texts, positive_clip, positive_pooled), per_prompt)
        negative_features = (
            repeat_rows(features(negative_texts, negative_clip, negative_pooled), per_prompt) if cfg else None
        )
        if conditioning.timestep_aware:
            # ELLA: the hook conditions every UNet call at its timestep; the CLIP embeddings returned here only set
            # the batch layout (the pooled ones too: the hook replaces text_embeds).
            hooks.close()
            hooks.enter_context(conditioning_hook(pipe.unet, conditioning, positive, negative_features or positive))
            out, negative_out = clip_output(positive), clip_output(negative_features)
        else:
            t = pipe.scheduler.config.num_train_timesteps - 1  # SUR ignores it
            out = conditioning.output(positive, t)
            negative_out = None if negative_features is None else conditioning.negative_output(negative_features, t)
        return pipeline_embeds(out, negative_out, positive_clip.dtype, xl)

    pipe.encode_prompt = encode_prompt
    try:
        with hooks:
            yield pipe
    finally:
        del pipe.encode_prompt  # the class's own method again
