"""CLIP score with open_clip: how well each image matches its prompt.

CLIPScore (Hessel et al. 2021, as in torchmetrics): ``100 · max(cos(E_img, E_txt), 0)`` per pair,
in [0, 100]. torchmetrics' own ``CLIPScore`` crashes with transformers 5, so the embeddings come
from open_clip. Prompts longer than the text tower's context (77 tokens for CLIP) are truncated
by the tokenizer, as CLIP always does; ``CLIPScorer.truncated`` counts them so a report can say
how many prompts CLIP only partly read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

CONFIG_KEY = "metrics.clip.pretrained"


def to_pil_list(images: Sequence[Image.Image] | torch.Tensor) -> list[Image.Image]:
    """A list of RGB PIL images from a list of PIL images or a float tensor [B, 3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]
    return [image.convert("RGB") for image in images]


class CLIPScorer:
    """Score image–prompt pairs with an open_clip model.

    ``model_name``: an open_clip model name ("ViT-L-14", "ViT-B-32", or one added with
    ``open_clip.add_model_config``); ``pretrained``: an open_clip tag ("openai",
    "laion2b_s32b_b82k"), a local checkpoint file, or ``None`` for random weights (tests only).
    Weights that cannot be loaded raise a ``RuntimeError`` naming them and the config key
    ``metrics.clip.pretrained`` to point at a local file.
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", device: str = "cpu"):
        import open_clip

        if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
            raise RuntimeError(_missing_weights(model_name, pretrained, "no such file"))
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device
            )
        except Exception as error:  # open_clip raises RuntimeError/OSError/ValueError depending on the source
            if pretrained is None:
                raise
            raise RuntimeError(_missing_weights(model_name, pretrained, str(error))) from error
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.truncated = 0  # prompts cut at the context length, summed over all ``score`` calls

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def num_tokens(self, prompt: str) -> int:
        """Tokens the prompt needs, start/end tokens included (compare with ``context_length``)."""
        if hasattr(self.tokenizer, "encoder"):  # open_clip SimpleTokenizer (CLIP BPE)
            return len(self.tokenizer.encode(prompt)) + 2
        return len(self.tokenizer.tokenizer(prompt)["input_ids"])  # open_clip HFTokenizer

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] for PIL images or a tensor [B, 3, H, W] in [0, 1]."""
        pixels = torch.stack([self.preprocess(image) for image in to_pil_list(images)]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, D]; counts prompts longer than the context in ``truncated``."""
        self.truncated += sum(self.num_tokens(p) > self.context_length for p in prompts)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def score(self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP score per pair, a float tensor [B] in [0, 100]: ``100 · max(cos(image_i, prompt_i), 0)``."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        cosine = (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)
        return (100 * cosine).clamp(min=0).cpu()


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))


def _missing_weights(model_name: str, pretrained: str, reason: str) -> str:
    return (
        f"cannot load CLIP weights {pretrained!r} for open_clip model {model_name!r} ({reason}). "
        f"This machine may be offline: download the checkpoint where there is network access and set "
        f"{CONFIG_KEY}=/path/to/open_clip_model.safetensors (a local file), or set HF_HUB_OFFLINE=1 "
        f"to fail fast instead of retrying the hub."
    )
