"""A discrete image tokenizer: a frozen VAE's latent grid, vector-quantised by a learned codebook.

The first stage of the VQ-VAE + PixelSNAIL pipeline. Rather than train a VQ-VAE's encoder and decoder
from scratch, it reuses a frozen ``AutoencoderKL`` (the toy world's base VAE, or SD's) and learns only
a codebook over its latent vectors, with ``vector-quantize-pytorch``'s ``VectorQuantize``: codes are
initialised by k-means on the first training batch, moved by an exponential moving average of the
vectors assigned to them (no gradients), and a code used less than ``threshold_ema_dead_code`` times
(in the EMA) is restarted on a vector of the batch. On the toy world (64 px, x4 VAE) the grid is 16x16.

Shapes (B batch, R image side, f = the VAE's downsampling factor, G = R / f, C = its latent channels,
K = ``codebook_size``)::

    images  [B, 3, R, R] float in [-1, 1]
      -> encode_latents  latents [B, C, G, G]   (the VAE posterior's mean: deterministic)
      -> quantize        codes [B, G, G] int64 in [0, K), quantized latents [B, C, G, G]
      -> decode          images [B, 3, R, R] float in [-1, 1]

``encode(images)`` = codes, ``decode(codes)`` = images. ``forward`` is the training call: in train mode
it updates the codebook (EMA) and returns the reconstruction too.

``save_pretrained(folder)`` writes ``config.json`` (the constructor's arguments) and
``quantizer.safetensors`` (the codebook and its EMA statistics); ``from_pretrained(folder)`` reads them.
The VAE is not copied: ``config.json`` names its folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "quantizer.safetensors"


class CodebookNotFittedError(RuntimeError):
    """``encode`` before any training batch initialised the codebook; the message says how to get one."""


class LatentVQTokenizer(nn.Module):
    """Frozen VAE + EMA codebook over its latent vectors (see the module docstring for shapes).

    vae:                     a Stable Diffusion folder (with ``vae/``), an ``AutoencoderKL`` folder itself, or a
                             Stable Diffusion hub id (its ``vae/``, from the hub cache offline).
    codebook_size:           K, the number of codes (the prior's vocabulary). 256 at 16x16 passes the
                             toy world's checker gate.
    decay:                   EMA decay of the codebook (vector-quantize-pytorch's default 0.8 moves fast:
                             the latent vectors are few and low-dimensional).
    kmeans_iters:            k-means iterations of the first-batch initialisation.
    threshold_ema_dead_code: a code whose EMA usage falls below this is restarted on a batch vector.
    """

    def __init__(
        self,
        vae: str,
        codebook_size: int = 256,
        decay: float = 0.8,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL
        from vector_quantize_pytorch import VectorQuantize

        self.config = {
            "vae": str(vae),
            "codebook_size": int(codebook_size),
            "decay": float(decay),
            "kmeans_iters": int(kmeans_iters),
            "threshold_ema_dead_code": float(threshold_ema_dead_code),
        }
        folder = Path(vae)
        if folder.exists():
            subfolder = "vae" if (folder / "vae").is_dir() else None
            if not (folder / (subfolder or "") / "config.json").is_file():
                raise FileNotFoundError(f"LatentVQTokenizer: {folder} holds no VAE (no config.json in it or in vae/)")
            self.vae = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=torch.float32)
        else:  # a hub id (backbone=sd15's default): its vae/ from the hub or its cache
            try:
                self.vae = AutoencoderKL.from_pretrained(str(vae), subfolder="vae", torch_dtype=torch.float32)
            except (OSError, ValueError) as error:
                raise FileNotFoundError(
                    f"LatentVQTokenizer: cannot load the VAE of {vae!r} ({type(error).__name__}: {str(error)[:200]}); "
                    "offline, point backbone.pretrained (model.tokenizer.vae) at a local Stable Diffusion folder"
                ) from error
        self.vae.requires_grad_(False).eval()
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.codebook_size = int(codebook_size)
        self.quantizer = VectorQuantize(
            dim=self.latent_channels,
            codebook_size=self.codebook_size,
            decay=decay,
            kmeans_init=True,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            accept_image_fmap=True,  # [B, C, G, G] in, codes [B, G, G] out
            # Nothing upstream is trained (the encoder is frozen), so no commitment loss and no gradient trick.
            commitment_weight=0.0,
            rotation_trick=False,
        )

    def train(self, mode: bool = True) -> LatentVQTokenizer:
        # Only the codebook follows the mode (EMA updates in training); the frozen VAE stays in eval.
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def fitted(self) -> bool:
        """Whether the codebook was initialised (k-means on a training batch, or loaded)."""
        return bool(self.quantizer._codebook.initted)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> the VAE posterior's mean [B, C, G, G]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"LatentVQTokenizer.encode: expected images [B, 3, R, R], got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(
                f"LatentVQTokenizer.encode: image side {tuple(images.shape[-2:])} is not a multiple of {self.downsample}"
            )
        return self.vae.encode(images.float()).latent_dist.mean

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, C, G, G] -> (quantized latents [B, C, G, G], codes [B, G, G] int64).
        In train mode this also moves the codebook (EMA, dead-code restarts); the first call fits it by k-means."""
        if not self.training and not self.fitted:
            raise CodebookNotFittedError(
                "LatentVQTokenizer: the codebook was never fitted; train it (`python -m sur_lightning.train "
                "+experiment=vqvae_toy`) or load a trained one with LatentVQTokenizer.from_pretrained(folder)"
            )
        quantized, codes, _ = self.quantizer(latents)
        return quantized, codes.long()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> codes [B, G, G] int64 in [0, K). Deterministic in eval mode."""
        with torch.no_grad():
            return self.quantize(self.encode_latents(images))[1]

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, G, G] int -> their codebook vectors [B, C, G, G]."""
        if codes.ndim != 3:
            raise ValueError(f"LatentVQTokenizer.decode: expected codes [B, G, G], got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(
                f"LatentVQTokenizer.decode: codes in [{int(codes.min())}, {int(codes.max())}], "
                f"outside the codebook's [0, {self.codebook_size})"
            )
        # With accept_image_fmap the library returns the vectors channel-first already: [B, C, G, G].
        return self.quantizer.get_output_from_indices(codes.long())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, G, G] -> images [B, 3, R, R], clamped to [-1, 1]."""
        return self.vae.decode(latents).sample.clamp(-1, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, G, G] -> images [B, 3, R, R] in [-1, 1]."""
        return self.decode_latents(self.codes_to_latents(codes))

    def forward(self, images: torch.Tensor, reconstruct: bool = True) -> dict[str, torch.Tensor]:
        """images [B, 3, R, R] -> ``{"codes" [B, G, G], "latents", "quantized" [B, C, G, G],
        "reconstruction" [B, 3, R, R] (when ``reconstruct``)}``. In train mode the codebook moves."""
        latents = self.encode_latents(images)
        quantized, codes = self.quantize(latents)
        out = {"codes": codes, "latents": latents, "quantized": quantized}
        if reconstruct:
            out["reconstruction"] = self.decode_latents(quantized.detach())
        return out

    def fingerprint(self) -> str:
        """A short hash of the codebook: two tokenizers with the same one write the same codes (for a VAE of the
        same folder). The code database records it, so a resume with another tokenizer is refused."""
        embed = self.quantizer._codebook.embed.detach().float().cpu().contiguous()
        return hashlib.sha256(embed.numpy().tobytes()).hexdigest()[:16]

    # ------------------------------------------------------------------ files

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.quantizer.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, vae: str | None = None) -> LatentVQTokenizer:
        """Load a saved tokenizer; ``vae`` overrides the VAE folder its config names (the files moved)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved LatentVQTokenizer (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        config = json.loads((folder / CONFIG_NAME).read_text())
        if vae is not None:
            config["vae"] = str(vae)
        tokenizer = cls(**config)
        tokenizer.quantizer.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return tokenizer.eval()
