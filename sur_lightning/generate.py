"""Prompts → images with the base model and with a trained connector, same seeds, side by side.

Built on diffusers' ``StableDiffusionPipeline`` through ``prompt_embeds``/``negative_prompt_embeds``:
the connector conditions the prompt and the negative (empty) prompt separately, never mixing the two.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def build_pipeline(backbone, scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` over the backbone's frozen components (no copies)."""
    import diffusers

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    sampler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(backbone.noise_scheduler.config)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def render(
    pipeline,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    seeds: list[int],
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per row of ``prompt_embeds`` [B,N,d], row i seeded with ``seeds[i]``."""
    device = pipeline.unet.device
    dtype = pipeline.unet.dtype
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    # Draw the initial latents on the CPU so a seed gives the same image on every device.
    size = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    shape = (4, size // pipeline.vae_scale_factor, (width or size) // pipeline.vae_scale_factor)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
    return pipeline(
        prompt_embeds=prompt_embeds.to(device, dtype),
        negative_prompt_embeds=negative_prompt_embeds.to(device, dtype),
        latents=latents,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=size,
        width=width or size,
        output_type="pil",
    ).images


@torch.no_grad()
def render_base_and_adapter(module, prompts: list[str], seeds: list[int], scheduler: str = "ddim", **kwargs):
    """Images of ``prompts`` (one seed each) from the base model and through ``module.connector``.

    Returns (base_images, adapter_images). The negative prompt is the empty prompt, conditioned by
    the same path as the positive one but in its own call.
    """
    pipeline = build_pipeline(module.backbone, scheduler)
    empty = [""] * len(prompts)
    base = render(pipeline, module.backbone.encode_prompt(prompts), module.backbone.encode_prompt(empty), seeds, **kwargs)
    was_training = module.connector.training
    module.connector.eval()
    timesteps = torch.zeros(len(prompts), dtype=torch.long, device=module.backbone.device)
    adapted = render(
        pipeline,
        module.condition(prompts, timesteps).conditioning,
        module.condition(empty, timesteps).conditioning,
        seeds,
        **kwargs,
    )
    module.connector.train(was_training)
    return base, adapted


def labelled_grid(columns: dict[str, list[Image.Image]], row_labels: list[str], cell: int = 128) -> Image.Image:
    """A grid with one column per entry of ``columns`` and one row per label, titles drawn in."""
    header, label_width = 16, 160
    names = list(columns)
    grid = Image.new("RGB", (label_width + cell * len(names), header + cell * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((label_width + j * cell + 4, 2), name, fill="black")
        for i, image in enumerate(columns[name]):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + j * cell, header + i * cell))
    for i, label in enumerate(row_labels):
        draw.text((4, header + i * cell + cell // 2 - 6), label[:26], fill="black")
    return grid


def save_grid(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
