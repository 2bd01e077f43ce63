"""unCLIP at generation (arXiv 2204.06125): text -> prior -> image embedding -> decoder -> image, as a column.

``load_decoder`` / ``load_prior`` read the folders ``training/unclip_module.py`` exports. ``decode_embeddings``
draws one image per embedding [B, E] through the frozen UNet (the decoder's projection gives its context tokens
and its time-embedding offset; classifier-free guidance against the zero embedding, as the decoder was trained
with embedding dropout). ``DecoderRender`` is a column's ``render`` (``columns.Column``): prompts and seeds ->
PIL images, from any ``embed(prompts, seeds) -> [B, E]``; ``columns.unclip_column`` gives it the prior's samples
(``PriorEmbeddings``), ``columns.oracle_column`` the image tower's embeddings of true images (``TowerEmbeddings``).

unCLIP's own tools (§3) move in the image-embedding space instead of a text conditioning: ``variations`` (encode an
image with the image tower, decode its embedding with new noise), ``embedding_interpolation`` (slerp between two
embeddings, decoded with one noise) and ``embedding_text_diff`` (slerp from an image's embedding toward the
normalised difference of two captions' embeddings). ``generation/tools.py`` runs them on an unCLIP column.

The same seed gives the same embedding (prior) and the same initial latents (decoder), so a column is
deterministic per (prompt, seed) whatever the batch.

A prior trained on a stock pipeline's own prior text (``+experiment=unclip_sd21_clip``) is also exported as a plain
``PriorTransformer`` (``prior_transformer/``). ``stock_unclip_pipeline`` loads diffusers' ``StableUnCLIPPipeline``
with it as its ``prior``, and ``StockUnclipRender`` draws a column through that pipeline as it ships.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from sur_lightning.generation.interpolation import interpolate, slerp
from sur_lightning.models.image_tower import ImageTower
from sur_lightning.models.prior import DiffusionPrior
from sur_lightning.models.unclip_decoder import ImageEmbeddingProjection, added_time_embedding

DECODER_RECORD = "unclip_decoder.json"
PRIOR_RECORD = "unclip.json"
# The prior export's folder of the plain PriorTransformer that StableUnCLIPPipeline takes as its prior.
STOCK_PRIOR = "prior_transformer"


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


def stock_prior(folder: str | Path) -> dict | None:
    """What ``unclip.json`` of a prior export records of its ``prior_transformer/`` (``folder``, ``pipeline``: the
    StableUnCLIPPipeline whose prior text it read) when it holds one; None when it does not."""
    stock = read_record(folder, PRIOR_RECORD).get("prior_transformer") or {}
    return stock if stock.get("folder") else None


def stock_unclip_pipeline(pipeline: str | Path | None, prior_export: str | Path, torch_dtype=None):
    """diffusers' ``StableUnCLIPPipeline`` from ``pipeline`` (a hub id or a local folder; None: the one whose prior
    text the export read) with the trained prior as its ``prior``. The same as, in diffusers alone::

        prior = PriorTransformer.from_pretrained("<prior export>/prior_transformer")
        pipe = StableUnCLIPPipeline.from_pretrained("<pipeline>", prior=prior)
    """
    from diffusers import PriorTransformer, StableUnCLIPPipeline

    from sur_lightning.models.backbone import load_pretrained

    stock = stock_prior(prior_export)
    if stock is None:
        skipped = (read_record(prior_export, PRIOR_RECORD).get("prior_transformer") or {}).get("skipped")
        raise ValueError(
            f"{prior_export} holds no {STOCK_PRIOR}/ for StableUnCLIPPipeline: "
            + (skipped or "it was exported before priors were also exported in that format")
        )
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    prior = PriorTransformer.from_pretrained(str(Path(prior_export) / stock["folder"]), **dtype)
    pipeline = str(pipeline or stock["pipeline"])
    return load_pretrained(StableUnCLIPPipeline, pipeline, "unclip_pipeline", prior=prior.eval(), **dtype)


class StockUnclipRender:
    """A column's ``render`` (``DecoderRender``'s arguments) through a ``StableUnCLIPPipeline`` as it ships: its
    prior text encoder, prior chain, image noising and decoder, with the trained prior (``stock_unclip_pipeline``).

    One pipeline call per (prompt, seed), its generator seeded by the seed on the CPU (the other columns draw their
    noise there too), so an image does not depend on its batch. ``scheduler`` picks the decoder's sampler from the
    pipeline's own scheduler config, as for the other columns; the prior's chain is the pipeline's DDPM
    (``prior_num_inference_steps``, ``prior_guidance_scale``: the pipeline's defaults)."""

    def __init__(self, pipeline, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0) -> None:
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler_config = pipeline.scheduler.config
        self.prior_num_inference_steps = prior_num_inference_steps
        self.prior_guidance_scale = prior_guidance_scale

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        scheduler: str = "ddim",
        negative_prompt: str = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 10.0,
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image.Image]:
        from sur_lightning.generation.pipeline import sampler_named

        self.pipeline.scheduler = sampler_named(scheduler, self.scheduler_config)
        images = []
        for prompt, seed in zip(prompts, seeds):
            images += self.pipeline(
                prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=torch.Generator().manual_seed(int(seed)),
                prior_num_inference_steps=self.prior_num_inference_steps,
                prior_guidance_scale=self.prior_guidance_scale,
                output_type="pil",
            ).images
        return images


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


def load_image_tower(*records: dict) -> ImageTower | None:
    """The image tower the first of ``records`` that names one existing here (``image_tower.path``) was trained
    with, its weights checked against its ``image_tower.json`` when it has one; None when none does."""
    from sur_lightning.toyworld import IMAGE_TOWER_RECORD, verify_image_tower

    for record in records:
        path = (record.get("image_tower") or {}).get("path")
        if path and (Path(path) / "config.json").exists():
            if (Path(path) / IMAGE_TOWER_RECORD).exists():
                verify_image_tower(path)
            return ImageTower.from_pretrained(str(path)).eval()
    return None


class DecoderRender:
    """A column's ``render``: ``(prompts, seeds, scheduler=, num_inference_steps=, guidance_scale=, height=, width=,
    negative_prompt=) -> images``, decoding ``embed(prompts, seeds)`` [B, E]. The negative prompt does not apply
    (the decoder's unconditional branch is the zero embedding). ``tower``: the image tower of the embedding space,
    for the tools that encode an image (``encode``); None when the export names none that exists here."""

    def __init__(
        self,
        backbone,
        projection: ImageEmbeddingProjection,
        embed: Callable[[list[str], list[int]], torch.Tensor],
        tower: ImageTower | None = None,
    ):
        self.backbone = backbone
        self.projection = projection
        self.embed = embed
        self.tower = tower
        self._pipelines: dict[str, object] = {}

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, E]: the image tower's embeddings of ``images`` (resized to the tower's side)."""
        if self.tower is None:
            raise ValueError(
                "this unCLIP column has no image tower (its unclip.json and its decoder's record name none that "
                "exists here): encoding an image (variations, tool.images) needs the tower the decoder was trained on"
            )
        size = self.tower.config.image_size
        pixels = torch.stack([to_pixels(image, size) for image in images])
        return self.tower.embed_images(pixels.to(self.tower.device)).cpu()

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


# ------------------------------------------------------------------ unCLIP's tools, in image-embedding space (§3)


def variations(
    pipeline, render: DecoderRender, image: Image.Image, seeds: Sequence[int], **sampler
) -> list[Image.Image]:
    """unCLIP's variations: the image tower's embedding z_i [1, E] of ``image``, decoded once per seed (new noise,
    the same embedding), so what the embedding holds stays and the rest varies. Returns len(seeds) images; the
    image of seed s is exactly ``decode_embeddings`` of z_i from seed s. ``sampler``: ``decode_embeddings``' knobs."""
    embedding = render.encode([image])
    return decode_embeddings(pipeline, render.projection, embedding.expand(len(seeds), -1), seeds, **sampler)


def embedding_interpolation(
    pipeline,
    render: DecoderRender,
    start: torch.Tensor,
    end: torch.Tensor,
    weights: Sequence[float],
    seed: int,
    method: str = "slerp",
    **sampler,
) -> list[Image.Image]:
    """unCLIP's interpolation: z_t = slerp(start, end, t) [K, E] for the K ``weights`` (``start``/``end`` [E]: two
    images' tower embeddings, or two prompts' prior samples), every one decoded from ``seed``'s noise, so only the
    embedding moves. t = 0 and t = 1 are exactly the decodes of ``start`` and ``end``."""
    t = torch.tensor([float(w) for w in weights]).reshape(-1, 1)
    path = interpolate(start.reshape(1, -1).float(), end.reshape(1, -1).float(), t, method)
    return decode_embeddings(pipeline, render.projection, path, [seed] * len(t), **sampler)


def embedding_text_diff(
    pipeline,
    render: DecoderRender,
    image_embedding: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    strengths: Sequence[float],
    seed: int,
    **sampler,
) -> list[Image.Image]:
    """unCLIP's text diff: z_d = normalise(z_t − z_t0) with z_t0 = ``source`` and z_t = ``target`` [E] the two
    captions' embeddings, then slerp(z_i, z_d, s) [K, E] from the image's embedding z_i = ``image_embedding`` [E]
    for the K ``strengths``, all decoded from ``seed``'s noise; s = 0 is the image's own decode.

    DALL·E 2 takes z_t, z_t0 from CLIP's text tower. The toy world's text side (``ImageTower.text_head``) is trained
    only to retrieve, not to land where the images lie, so here the prior's samples for the two captions, already in
    the image-embedding space, are the practical stand-in (``tools.TextDiffs`` passes them)."""
    difference = (target - source).reshape(1, -1).float()
    if float(difference.norm()) < 1e-6:
        raise ValueError("the two captions give the same embedding: their difference has no direction to move along")
    direction = torch.nn.functional.normalize(difference, dim=-1)
    s = torch.tensor([float(v) for v in strengths]).reshape(-1, 1)
    path = slerp(image_embedding.reshape(1, -1).float(), direction, s)
    return decode_embeddings(pipeline, render.projection, path, [seed] * len(s), **sampler)
