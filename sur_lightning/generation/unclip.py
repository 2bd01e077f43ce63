"""unCLIP at generation (arXiv 2204.06125): text -> prior -> image embedding -> decoder -> image, as a column.

``load_decoder`` / ``load_prior`` read the folders ``training/unclip_module.py`` exports. ``decode_embeddings``
draws one image per embedding [B, E] through the frozen UNet (the decoder's projection gives its context tokens
and its time-embedding offset; classifier-free guidance against the zero embedding, as the decoder was trained
with embedding dropout). ``DecoderRender`` is a column's ``render`` (``columns.Column``): prompts and seeds ->
PIL images, from any ``embed(prompts, seeds) -> [B, E]``; ``columns.unclip_column`` gives it the prior's samples
(``PriorEmbeddings``), ``columns.oracle_column`` the image tower's embeddings of true images (``TowerEmbeddings``).

The same seed gives the same embedding (prior) and the same initial latents (decoder), so a column is
deterministic per (prompt, seed) whatever the batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from sur_lightning.models.image_tower import ImageTower
from sur_lightning.models.prior import DiffusionPrior
from sur_lightning.models.unclip_decoder import ImageEmbeddingProjection, added_time_embedding

DECODER_RECORD = "unclip_decoder.json"
PRIOR_RECORD = "unclip.json"


def clip_pooled(backbone, clip_states: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """[B, d]: CLIP's pooled state (what ``CLIPTextModel`` returns as ``pooler_output``: the final-norm state at the
    end token, the highest id) picked from its last hidden states [B, 77, d]."""
    end = backbone.tokenize(list(prompts)).argmax(dim=-1).to(clip_states.device)
    return clip_states[torch.arange(len(end), device=clip_states.device), end]


def read_record(folder: str | Path, name: str) -> dict:
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an unCLIP export: it has no {name}")
    return json.loads(path.read_text())


def load_decoder(folder: str | Path) -> tuple[ImageEmbeddingProjection, dict]:
    """The decoder's projection (eval mode) and its ``unclip_decoder.json``."""
    record = read_record(folder, DECODER_RECORD)
    return ImageEmbeddingProjection.from_pretrained(str(folder)).eval(), record


def load_prior(folder: str | Path) -> tuple[DiffusionPrior, dict]:
    """The prior (eval mode, fitted statistics checked) and its ``unclip.json`` (which names its decoder)."""
    record = read_record(folder, PRIOR_RECORD)
    prior = DiffusionPrior.from_pretrained(str(Path(folder) / "prior")).eval()
    prior.check_fitted()
    return prior, record


@torch.no_grad()
def decode_embeddings(
    pipeline,
    projection: ImageEmbeddingProjection,
    embeds: torch.Tensor,
    seeds: Sequence[int],
    num_inference_steps: int = 30,
    guidance_scale: float = 4.0,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per embedding [B, E], image i from ``seeds[i]``'s initial latents; guidance against the zero
    embedding (the decoder's dropped embedding) when ``guidance_scale`` > 1."""
    from sur_lightning.generation.pipeline import seeded_noise

    if len(embeds) != len(seeds):
        raise ValueError(f"got {len(embeds)} embeddings but {len(seeds)} seeds")
    device, dtype = pipeline.unet.device, pipeline.unet.dtype
    size = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or size
    projection = projection.to(device)
    tokens, offset = projection(embeds.to(device))
    null_tokens, null_offset = projection(torch.zeros_like(embeds).to(device))
    guided = guidance_scale > 1.0  # StableDiffusionPipeline's own test: then it batches [negative; prompt]
    latents = torch.stack([seeded_noise(pipeline, seed, size, width) for seed in seeds])
    with added_time_embedding(pipeline.unet, torch.cat([null_offset, offset]) if guided else offset):
        return pipeline(
            prompt_embeds=tokens.to(dtype),
            negative_prompt_embeds=null_tokens.to(dtype),
            latents=latents.to(device, dtype),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=size,
            width=width,
            output_type="pil",
        ).images


class DecoderRender:
    """A column's ``render``: ``(prompts, seeds, scheduler=, num_inference_steps=, guidance_scale=, height=, width=,
    negative_prompt=) -> images``, decoding ``embed(prompts, seeds)`` [B, E]. The negative prompt does not apply
    (the decoder's unconditional branch is the zero embedding)."""

    def __init__(
        self, backbone, projection: ImageEmbeddingProjection, embed: Callable[[list[str], list[int]], torch.Tensor]
    ):
        self.backbone = backbone
        self.projection = projection
        self.embed = embed
        self._pipelines: dict[str, object] = {}

    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], scheduler: str = "ddim", negative_prompt: str = "", **kwargs
    ) -> list[Image.Image]:
        from sur_lightning.generation.pipeline import build_pipeline

        if scheduler not in self._pipelines:
            self._pipelines[scheduler] = build_pipeline(self.backbone, scheduler)
        embeds = self.embed(list(prompts), [int(s) for s in seeds])
        return decode_embeddings(self._pipelines[scheduler], self.projection, embeds, seeds, **kwargs)


class PriorEmbeddings:
    """``(prompts, seeds) -> [B, E]``: the prior's sample for each (prompt, seed), one chain each, seeded by the seed.

    text_features: prompts -> TextFeatures with ``clip`` [B, 77, d], ``llm`` token states [B, L, D], ``llm_mask``.
    guidance_scale: the prior's classifier-free guidance against the empty prompt (1.0: none).
    """

    def __init__(
        self, backbone, prior: DiffusionPrior, text_features, num_inference_steps: int = 25, guidance_scale: float = 1.0
    ) -> None:
        self.backbone = backbone
        self.prior = prior
        self.text_features = text_features
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale

    def text(self, prompts: list[str]):
        features = self.text_features(prompts)
        return features.llm, features.llm_mask, clip_pooled(self.backbone, features.clip, prompts)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        # One prompt at a time, as the feature cache stores them: in a padded batch an LLM's states depend on the
        # batch's longest prompt, so a batched embedding would depend on which prompts shared its batch.
        negative = self.text([""]) if self.guidance_scale != 1.0 else None
        rows = []
        for prompt, seed in zip(prompts, seeds):
            states, mask, pooled = self.text([prompt])
            rows.append(
                self.prior.sample(
                    states,
                    mask,
                    pooled,
                    generator=int(seed),
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    negative=negative,
                )
            )
        return torch.cat(rows)


class TowerEmbeddings:
    """``(prompts, seeds) -> [B, E]``: the image tower's embeddings of ``reference(prompt, seed)``, a true image of
    each prompt (the toy world: ``world.draw_example`` of the prompt's target, seeded)."""

    def __init__(self, tower: ImageTower, reference: Callable[[str, int], Image.Image]) -> None:
        self.tower = tower.eval()
        self.reference = reference

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        size = self.tower.config.image_size
        pixels = torch.stack([to_pixels(self.reference(p, s), size) for p, s in zip(prompts, seeds)])
        return self.tower.embed_images(pixels.to(self.tower.device))


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1], as the tower reads."""
    import numpy as np

    array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
