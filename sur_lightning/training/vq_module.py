"""Fitting the VQ tokenizer's codebook in the project's Lightning loop (``+experiment=vqvae_toy``).

``VQTokenizerModule`` wraps a ``LatentVQTokenizer`` (``models/vq_tokenizer.py``: a frozen VAE and an EMA codebook
over its latent vectors). Nothing is trained by gradients: each training step encodes the batch's images with the
frozen VAE and moves the codebook (k-means on the first batch, an exponential moving average after, dead codes
restarted), so there is no optimizer and no loss to back-propagate.

Shapes (B batch, R image side, G = R / f, C latent channels, K codes)::

    batch["pixel_values"] [B, 3, R, R] in [-1, 1]
      -> frozen VAE encoder: latents [B, C, G, G] (posterior mean)
      -> codebook (EMA update in training): codes [B, G, G], quantized [B, C, G, G]
      -> logged: train/latent_mse (quantized vs latents), train/codes_used (share of the K codes in the batch)
    validation: -> frozen VAE decoder: reconstruction [B, 3, R, R]; val/mse, val/psnr and val/ssim in [0, 1]
                pixel units

Checkpoints hold the codebook alone (its EMA statistics included), so ``ckpt_path=last`` resumes the fit;
``export_pretrained(folder)`` writes the tokenizer that the code extraction reads (``config.json`` +
``quantizer.safetensors``).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from sur_lightning.models.vq_tokenizer import LatentVQTokenizer


class VQTokenizerModule(L.LightningModule):
    """Fits ``tokenizer``'s codebook on the training images (see the module docstring). Its k-means
    initialisation and dead-code restarts draw from the global generator, which ``train`` seeds."""

    def __init__(self, tokenizer: LatentVQTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        # Checkpoints hold the codebook only; the frozen VAE comes back from its folder.
        self.strict_loading = False

    def training_step(self, batch: dict, batch_idx: int) -> None:
        out = self.tokenizer(batch["pixel_values"], reconstruct=False)
        batch_size = out["codes"].shape[0]
        self.log("train/latent_mse", F.mse_loss(out["quantized"], out["latents"]), prog_bar=True, batch_size=batch_size)
        used = out["codes"].unique().numel() / self.tokenizer.codebook_size
        self.log("train/codes_used", used, batch_size=batch_size)
        # Nothing returned: no gradients, the codebook moved by its moving average above.

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.tokenizer.fitted:  # Lightning's sanity check runs before the first training batch
            return
        images = batch["pixel_values"]
        reconstruction = self.tokenizer(images)["reconstruction"]
        mse = F.mse_loss((reconstruction + 1) / 2, (images + 1) / 2)
        self.log("val/mse", mse, prog_bar=True, batch_size=images.shape[0])
        self.log("val/psnr", 10 * math.log10(1.0 / max(float(mse), 1e-12)), batch_size=images.shape[0])
        ssim = structural_similarity_index_measure(
            (reconstruction.clamp(-1, 1) + 1) / 2, (images + 1) / 2, data_range=1.0
        )
        self.log("val/ssim", ssim, batch_size=images.shape[0])

    def configure_optimizers(self):
        return None  # EMA codebook: nothing to optimise

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith("tokenizer.quantizer.")
        }

    def export_pretrained(self, folder: str | Path, trained_with: dict | None = None) -> Path:
        """The tokenizer's folder (config.json + quantizer.safetensors); it records its own VAE."""
        return self.tokenizer.save_pretrained(folder)
