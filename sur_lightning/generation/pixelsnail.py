"""A column drawn by the VQ-VAE + PixelSNAIL generator instead of the diffusion UNet.

``PixelSNAILSampler(prompts, seeds) -> PIL images``: the LLM's token states of each prompt
(``PromptStates``) condition a trained ``PixelSNAIL``, which draws a code grid per (prompt, seed) in raster order
(classifier-free guidance ``guidance_scale``, ``temperature``; row b's draws come from a generator seeded by its
seed alone, so an image does not depend on its batch); the VQ tokenizer turns the codes into latents and its frozen
VAE decoder into images. ``columns.pixelsnail_column(folder)`` wraps it as a ``Column`` (``Column.render``), which
``render_columns`` renders like any other, so the toy-world checker scores it beside the connectors.

``folder``: an export of ``+experiment=pixelsnail_toy`` (``<run>/pixelsnail/`` or ``pixelsnail-step{N}/``):
``prior/``, ``tokenizer/`` and ``trained_with.json`` (the LLM config it read).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sur_lightning.models.pixelsnail import PixelSNAIL, PromptStates
from sur_lightning.models.vq_tokenizer import LatentVQTokenizer


class PixelSNAILSampler:
    """prompts [n], seeds [n] -> n PIL images (see the module docstring). ``batch_size`` rows per draw
    (each draw is G*G forward passes of 2 x batch_size rows with guidance)."""

    def __init__(
        self,
        prior: PixelSNAIL,
        tokenizer: LatentVQTokenizer,
        text: PromptStates,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        batch_size: int = 64,
    ) -> None:
        self.prior = prior.eval()
        self.tokenizer = tokenizer.eval()
        self.text = text
        self.guidance_scale = float(guidance_scale)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"PixelSNAILSampler: {len(prompts)} prompts but {len(seeds)} seeds")
        device = next(self.prior.parameters()).device
        images = []
        for start in range(0, len(prompts), self.batch_size):
            chunk, chunk_seeds = prompts[start : start + self.batch_size], seeds[start : start + self.batch_size]
            pooled, tokens, mask = (t.to(device) for t in self.text(chunk))
            generators = [torch.Generator().manual_seed(int(seed)) for seed in chunk_seeds]
            codes = self.prior.sample(
                pooled,
                tokens,
                mask,
                temperature=self.temperature,
                guidance_scale=self.guidance_scale,
                generator=generators,
            )
            pixels = self.tokenizer.decode(codes.to(device))  # [B, 3, R, R] in [-1, 1]
            array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(np.ascontiguousarray(a)) for a in array]
        return images

    @classmethod
    def from_pretrained(cls, folder: str | Path, llm: nn.Module | None = None, **knobs) -> PixelSNAILSampler:
        """Load an export folder. ``llm``: the LLM module it was trained with (else built from ``trained_with.json``)."""
        folder = Path(folder)
        if not (folder / "prior").is_dir() or not (folder / "tokenizer").is_dir():
            raise FileNotFoundError(f"{folder} is not a PixelSNAIL export (needs prior/ and tokenizer/)")
        if llm is None:
            from hydra.utils import instantiate

            record = (
                json.loads((folder / "trained_with.json").read_text())
                if (folder / "trained_with.json").exists()
                else {}
            )
            entry = record.get("llm") or {}
            # training_record's {"id", ..., "config": node}; exports written before ModelExport shared the connectors'
            # record hold the LLM's config node itself.
            node = entry.get("config") if "_target_" not in entry else entry
            if not node:
                raise ValueError(f"{folder}: trained_with.json names no LLM; pass llm= (the one it was trained with)")
            llm = instantiate(node)
        prior = PixelSNAIL.from_pretrained(str(folder / "prior"))
        tokenizer = LatentVQTokenizer.from_pretrained(folder / "tokenizer")
        if prior.config.codebook_size != tokenizer.codebook_size:
            raise ValueError(
                f"{folder}: the prior has {prior.config.codebook_size} codes, the tokenizer {tokenizer.codebook_size}"
            )
        return cls(prior, tokenizer, PromptStates(llm), **knobs)
