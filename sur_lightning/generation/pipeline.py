"""Images from a pipeline over the backbone's frozen parts, conditioned per UNet call (``conditioning.py``).

``build_pipeline(backbone, scheduler)`` assembles diffusers' ``StableDiffusionPipeline`` from the loaded
components (no copies; DDIM without SD's ``clip_sample``). ``render`` draws one image per (prompt, seed),
with the initial latents drawn on the CPU so a seed gives the same image on every device;
``render_columns`` runs every (prompt, seed) through every column and returns ``Rendered`` items;
``render_base_and_adapter`` is what the training callbacks sample with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.generation.conditioning import (
    ClipConditioning,
    ConnectorConditioning,
    NonFiniteConditioningError,
    conditioning_hook,
    frozen_text_features,
)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def build_pipeline(backbone, scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) over the backbone's frozen components
    (no copies)."""
    pipeline = backbone.assemble_pipeline(sampler_named(scheduler, backbone.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampler_named(scheduler: str, config):
    """The sampler named ``scheduler`` (``SCHEDULERS``) from a scheduler's ``config`` (its betas, prediction type)."""
    import diffusers

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    # The training scheduler (DDPM) carries clip_sample=True, which SD's DDIM sampling must not use.
    overrides = {"clip_sample": False} if scheduler == "ddim" else {}
    return getattr(diffusers, SCHEDULERS[scheduler]).from_config(config, **overrides)


def placeholder_embeds(pipeline, features, batch: int) -> dict[str, torch.Tensor]:
    """The ``prompt_embeds`` (and SDXL's pooled) arguments a diffusers pipeline needs beside the conditioning hook.

    The hook computes the real conditioning at every UNet call; the pipeline only needs the batch size, device
    and dtype from these, so one zero token each is enough (running the connector here would cost two calls
    whose output is thrown away)."""
    placeholder = torch.zeros(batch, 1, pipeline.unet.config.cross_attention_dim)
    embeds = {"prompt_embeds": placeholder, "negative_prompt_embeds": placeholder.clone()}
    if features.pooled is not None:  # SDXL: the pooled embeddings too (the hook replaces them as well)
        pooled = torch.zeros(batch, features.pooled.shape[-1])
        embeds |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": pooled.clone()}
    return {name: value.to(pipeline.unet.device, pipeline.unet.dtype) for name, value in embeds.items()}


def seeded_noise(pipeline, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The initial latents [C, h, w] of ``seed``, drawn on the CPU so a seed gives the same image on every device."""
    size = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or size
    shape = (pipeline.unet.config.in_channels, size // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def render(
    pipeline,
    conditioning: ClipConditioning,
    prompts: Sequence[str],
    seeds: Sequence[int],
    negative_prompt: str = "",
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    latents: torch.Tensor | None = None,
) -> list[Image.Image]:
    """One image per prompt, prompt i seeded with ``seeds[i]``, conditioned by ``conditioning`` at every step.
    ``latents`` [B, C, h, w]: initial noise to use instead of the seeds' (an interpolated noise path)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    device = pipeline.unet.device
    dtype = pipeline.unet.dtype
    features = conditioning.features(prompts)
    negative = conditioning.features([negative_prompt] * len(prompts))
    size = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or size
    if latents is None:
        latents = torch.stack([seeded_noise(pipeline, seed, size, width) for seed in seeds])
    elif latents.shape[0] != len(prompts):
        raise ValueError(f"got {latents.shape[0]} initial latents for {len(prompts)} prompts")
    with conditioning_hook(pipeline.unet, conditioning, features, negative):
        return pipeline(
            **placeholder_embeds(pipeline, features, len(prompts)),
            latents=latents.to(device, dtype),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=size,
            width=width,
            output_type="pil",
        ).images


@torch.no_grad()
def render_base_and_adapter(
    module,
    prompts: list[str],
    seeds: list[int],
    scheduler: str = "ddim",
    mode: str = "replace",
    adapter: bool = True,
    **kwargs,
):
    """Images of ``prompts`` (one seed each) from the base model and through ``module.connector``.

    Returns (base_images, adapter_images); adapter_images is None with ``adapter=False``. The adapter
    path uses ``module.text_features``, so what the connector reads at sampling time is what it read
    in training.
    """
    pipeline = build_pipeline(module.backbone, scheduler)
    base = render(pipeline, ClipConditioning(frozen_text_features(module.backbone)), prompts, seeds, **kwargs)
    if not adapter:
        return base, None
    was_training = module.connector.training
    module.connector.eval()
    try:
        adapted = render(
            pipeline, ConnectorConditioning(module.connector, module.text_features, mode), prompts, seeds, **kwargs
        )
    finally:
        module.connector.train(was_training)
    return base, adapted


@dataclass
class Rendered:
    """One generated image and what produced it; ``info``: a tool's own record of it (t, strength, score)."""

    column: str
    prompt: Prompt
    seed: int
    image: Image.Image
    file: str | None = None
    info: dict = field(default_factory=dict)


def render_columns(
    backbone,
    columns: Sequence,  # columns.Column (not imported: columns -> unclip -> pipeline would close a circle)
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    out_dir: str | Path | None = None,
    scheduler: str = "ddim",
    batch_size: int = 4,
    negative_prompt: str = "",
    progress: bool = True,
    **kwargs,
) -> list[Rendered]:
    """Every (prompt, seed) through every column (its conditioning, or its own ``render``), same seeds for all; writes
    ``<out_dir>/images/<column slug>/<prompt id>_seed<seed>.png`` when ``out_dir`` is given."""
    from tqdm.auto import tqdm

    pipeline = build_pipeline(backbone, scheduler)
    jobs = [(prompt, int(seed)) for prompt in prompts for seed in seeds]
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    results = []
    with tqdm(total=len(columns) * len(jobs), desc="generating", unit="img", disable=not progress) as bar:
        for column in columns:
            for batch in batches:
                texts, batch_seeds = [p.prompt for p, _ in batch], [s for _, s in batch]
                try:
                    if column.render is not None:  # a generator of its own (unCLIP, PixelSNAIL): same prompts and seeds
                        images = column.render(
                            texts, batch_seeds, scheduler=scheduler, negative_prompt=negative_prompt, **kwargs
                        )
                    else:
                        images = render(
                            pipeline, column.conditioning, texts, batch_seeds, negative_prompt=negative_prompt, **kwargs
                        )
                except NonFiniteConditioningError as error:
                    raise NonFiniteConditioningError(f"column {column.name!r}: {error}") from error
                for (prompt, seed), image in zip(batch, images):
                    item = Rendered(column.name, prompt, seed, image)
                    if out_dir is not None:
                        relative = Path("images") / column.slug / f"{prompt.id}_seed{seed}.png"
                        (Path(out_dir) / relative).parent.mkdir(parents=True, exist_ok=True)
                        image.save(Path(out_dir) / relative)
                        item.file = str(relative)
                    results.append(item)
                bar.update(len(batch))
    return results


def sampler_kwargs(sampler) -> dict:
    """The pipeline knobs of the ``sampler`` config node."""
    return {
        "scheduler": sampler.scheduler,
        "num_inference_steps": int(sampler.num_inference_steps),
        "guidance_scale": float(sampler.guidance_scale),
        "height": sampler.resolution,
        "width": sampler.resolution,
        "batch_size": int(sampler.batch_size),
    }
