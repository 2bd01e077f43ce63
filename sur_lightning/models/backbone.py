"""The frozen Stable Diffusion parts: UNet, VAE, CLIP text encoder, tokenizer, noise scheduler.

Everything loads with ``from_pretrained`` from a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``)
or a local folder in the same layout. ``StableDiffusionBackbone`` is the family's base: SDXL's backbone
(``sdxl.py``) is a subclass. The tiny and random models (``random_models.py``) are written as such folders,
with random weights and the real CLIP vocabulary, so the offline demo and the tests go through the very code
path users take with hub ids.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from torch import nn

from sur_lightning.models.weights import WeightsError, check_model_finite, weights_source

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotAvailableError(RuntimeError):
    """A model id or folder could not be loaded; the message says which and how to point at a local copy."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection; checked once per process.

    Without this, an unreachable hub costs minutes of retries per file before from_pretrained gives up.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(cls, pretrained: str, config_key: str, **kwargs):
    """``cls.from_pretrained(pretrained, **kwargs)`` with an error that tells the user what to do offline.

    A hub id is read from the local Hugging Face cache only when the hub cannot be reached, so a
    machine without network fails at once instead of retrying.
    """
    if not Path(pretrained).exists() and not hub_reachable():
        kwargs["local_files_only"] = True
    try:
        loaded = cls.from_pretrained(pretrained, **kwargs)
        # transformers 5 builds an empty tokenizer when its files are missing instead of raising.
        if hasattr(loaded, "get_vocab") and len(loaded) < 100:
            raise OSError(f"no tokenizer files found (the tokenizer built has {len(loaded)} tokens)")
    except (SafetensorError, OSError, ValueError) as error:
        # A malformed weights file is not a missing model: name the file, without the offline download hint.
        # transformers lets safetensors' own error through, which names no file ("header too large"); diffusers
        # wraps it in an OSError.
        broken = safetensors_error_in(error)
        if broken is not None:
            source = weights_source(pretrained, kwargs.get("subfolder"))
            raise WeightsError(f"{source} is not a readable safetensors file (SafetensorError: {broken})") from error
        what = f"{pretrained!r}" + (f" (subfolder {kwargs['subfolder']!r})" if kwargs.get("subfolder") else "")
        raise ModelNotAvailableError(
            f"Could not load {cls.__name__} from {what}: {error}\n"
            f"If the Hugging Face hub is unreachable, download the model elsewhere "
            f"(`huggingface-cli download {pretrained}`) and point the config at the local folder: "
            f"`{config_key}=/path/to/local/copy`."
        ) from error
    if isinstance(loaded, nn.Module):
        # NaN/inf weights would only show as black images. One pass over the state dict (weights.is_finite), on a
        # busy 2-core CPU: 52 ms for the tiny SD's 396 tensors (its whole load: 1.1 s); 1-1.5 ns per value, so
        # about 1.5 s for SD1.5's 1.07 B values, whose load takes longer.
        check_model_finite(loaded, pretrained, kwargs.get("subfolder"))
    return loaded


def safetensors_error_in(error: BaseException) -> SafetensorError | None:
    """The ``SafetensorError`` that ``error`` is or was raised from (its ``__cause__``/``__context__`` chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SafetensorError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class FrozenModule(nn.Module):
    """A pretrained model wrapper that is never trained: no gradients, and eval mode even when
    Lightning puts the LightningModule that holds it in train mode (dropout stays off)."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def drop_vae_encoder(self, reason: str) -> None:
        """Free the VAE's encoder (training from cached latents never runs it); a later ``encode_images`` then fails
        naming ``reason`` rather than with a bare ``NoneType`` error."""
        self.vae.encoder = None
        self.vae.quant_conv = None
        self.vae_encoder_dropped = reason

    def check_vae_encoder(self) -> None:
        reason = getattr(self, "vae_encoder_dropped", None)
        if reason:
            raise RuntimeError(
                f"this backbone's VAE encoder was dropped ({reason}); build another backbone to encode images"
            )


class StableDiffusionBackbone(FrozenModule):
    """Frozen SD components, always in eval mode, stored in ``dtype``.

    encode_prompt(list[str])         -> [B, 77, d]   CLIP last hidden states (d = cross_attention_dim)
    encode_text(list[str])           -> ([B, 77, d], None)   the same call as SDXL's (which also returns a pooled embedding)
    encode_images([B,3,H,W] in [-1,1]) -> DiagonalGaussianDistribution over [B, 4, H/f, W/f] latents
    unet(noisy [B,4,h,w], t [B], c [B,N,d]) -> prediction [B,4,h,w]  (float32)

    The base of the family: ``StableDiffusionXLBackbone`` (sur_lightning.models.sdxl) loads, freezes, encodes
    images and runs its UNet through this code, adding its second text encoder, the pooled embedding and the
    size/crop micro-conditioning.
    """

    # SDXL's size/crop conditioning (sur_lightning.models.sdxl); SD1.x/2.x has none.
    micro_conditioning = False

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        dtype: str = "float32",
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        compile_unet: bool = False,
    ) -> None:
        super().__init__()
        self.pretrained = str(pretrained)
        self.dtype = resolve_dtype(dtype)
        self.revision = revision
        self.variant = variant
        self.load_components()
        self.freeze()
        # Speed and memory options for the frozen UNet (benchmarked by `python -m sur_lightning.bench`):
        # channels-last convolutions are faster on tensor-core GPUs; checkpointing trades a second forward
        # for the activations the backward to the conditioning would keep; compile fuses the UNet's kernels
        # once (minutes) for every later step.
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if compile_unet:
            self.unet.compile()

    def load(self, cls, subfolder: str, weights: bool = True):
        """``cls`` from ``pretrained``'s ``subfolder`` at ``revision``; a model (``weights``) in ``dtype`` and ``variant``."""
        kwargs = {"revision": self.revision}
        if weights:
            kwargs.update(variant=self.variant, torch_dtype=self.dtype)
        return load_pretrained(cls, self.pretrained, "backbone.pretrained", subfolder=subfolder, **kwargs)

    def load_components(self) -> None:
        """The tokenizer, noise scheduler, CLIP text encoder, VAE (``load_vae``) and UNet."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = self.load(CLIPTokenizer, "tokenizer", weights=False)
        self.noise_scheduler = self.load(DDPMScheduler, "scheduler", weights=False)
        self.text_encoder = self.load(CLIPTextModel, "text_encoder")
        self.vae = self.load_vae()
        self.unet = self.load(UNet2DConditionModel, "unet")

    def load_vae(self):
        from diffusers import AutoencoderKL

        return self.load(AutoencoderKL, "vae")

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int | None:
        """SD1.x/2.x's UNet reads no pooled text embedding (SDXL's does: ``StableDiffusionXLBackbone``)."""
        return None

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        """[B, 77] token ids, padded to the tokenizer's length (``tokenizer``: this one's first by default)."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts))[0].float()

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CLIP states [B, 77, d], no pooled embedding): the same call as SDXL's backbone."""
        return self.encode_prompt(prompts), None

    def batch_time_ids(self, batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor):
        self.check_vae_encoder()
        return self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float() * self.vae.config.scaling_factor

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet prediction; gradients flow to ``conditioning`` (and SDXL's ``pooled``; the frozen weights get none).
        ``pooled`` and ``time_ids`` are SDXL's (``added_conditioning``); this UNet has no use for them."""
        if self.channels_last:
            noisy_latents = noisy_latents.to(memory_format=torch.channels_last)
        return self.unet(
            noisy_latents.to(self.dtype),
            timesteps,
            encoder_hidden_states=conditioning.to(self.dtype),
            **self.added_conditioning(pooled, time_ids),
        ).sample.float()

    def added_conditioning(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
        """The UNet's arguments besides the tokens: none for SD1.x/2.x."""
        return {}

    def assemble_pipeline(self, scheduler):
        """A ``StableDiffusionPipeline`` over these components (no copies)."""
        return assemble_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, scheduler)


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the real CLIP BPE from open_clip's bundled vocabulary.

    The token order is CLIP's own: 256 byte tokens, the same with ``</w>``, the 48,894 merges,
    then ``<|startoftext|>`` and ``<|endoftext|>`` — 49,408 tokens, identical to the hub tokenizer.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe_file = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_file) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A ``StableDiffusionPipeline`` over these parts, without a safety checker (none is needed offline or in the toy world)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def files_hash(path: str, subfolders: tuple[str, ...] = ()) -> str | None:
    """Hash of (name, size, mtime) of a local model's files: changes when its weights are rewritten. None for hub ids."""
    root = Path(path)
    if not root.exists():
        return None
    if root.is_file():
        files = [root]
    else:
        folders = [root / s for s in subfolders] if subfolders else [root]
        files = sorted(p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(root) if p != root else p.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
