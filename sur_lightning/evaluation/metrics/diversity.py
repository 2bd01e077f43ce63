"""Diversity: mean pairwise LPIPS between the images generated for the same prompt.

Higher means the seeds of one prompt give more varied pictures. LPIPS is torchmetrics'
``LearnedPerceptualImagePatchSimilarity``: its linear heads ship inside torchmetrics, but its
backbone (AlexNet / VGG16 / SqueezeNet ImageNet weights) comes from torchvision's download
cache. Without network access those weights must be on disk: pass ``backbone_weights`` (config
key ``metrics.lpips.backbone_weights``) or put the file in ``$TORCH_HOME/hub/checkpoints``.
Anything else raises a ``RuntimeError`` that names the missing file.

For tests or other metrics, any ``distance(a, b) -> [M]`` on image batches [M, 3, H, W] in
[0, 1] can be injected instead of LPIPS.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path

import torch

CONFIG_KEY = "metrics.lpips.backbone_weights"
# torchvision's checkpoint file for each LPIPS backbone (the name load_state_dict_from_url caches it under).
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lpips_distance(net_type: str = "alex", backbone_weights: str | Path | None = None) -> Distance:
    """An LPIPS distance ``(a, b) -> [M]`` for image batches [M, 3, H, W] in [0, 1] (torchmetrics).

    ``backbone_weights``: a local copy of torchvision's ``BACKBONE_FILES[net_type]``; ``None``
    uses torchvision's cache (downloading there when online).
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    if net_type not in BACKBONE_FILES:
        raise ValueError(f"net_type must be one of {sorted(BACKBONE_FILES)}, got {net_type!r}")
    file_name = BACKBONE_FILES[net_type]
    hub_dir = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as scratch:
        if backbone_weights is not None:
            if not Path(backbone_weights).is_file():
                raise RuntimeError(_missing(net_type, f"{backbone_weights} does not exist"))
            # torchvision looks the file up by name in <hub dir>/checkpoints; show it ours there.
            os.makedirs(Path(scratch) / "checkpoints")
            try:
                os.symlink(Path(backbone_weights).resolve(), Path(scratch) / "checkpoints" / file_name)
            except OSError:
                shutil.copy(backbone_weights, Path(scratch) / "checkpoints" / file_name)
            torch.hub.set_dir(scratch)
        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none", normalize=True)
        except Exception as error:  # URLError offline, RuntimeError on a bad hash or corrupt file
            raise RuntimeError(_missing(net_type, f"{type(error).__name__}: {error}")) from error
        finally:
            torch.hub.set_dir(hub_dir)
    metric.eval()

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return metric.net(a.float(), b.float(), normalize=True).flatten()

    return distance


def _missing(net_type: str, reason: str) -> str:
    return (
        f"LPIPS needs the torchvision ImageNet backbone weights {BACKBONE_FILES[net_type]!r} for net_type={net_type!r} "
        f"(the LPIPS linear heads ship with torchmetrics) and could not load them: {reason}. Offline, download the "
        f"file where there is network access and set {CONFIG_KEY}=/path/to/{BACKBONE_FILES[net_type]}, or copy it to "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}."
    )


def mean_pairwise_distance(images: torch.Tensor, distance: Distance) -> torch.Tensor:
    """Mean of ``distance`` over all unordered pairs of ``images`` [N, 3, H, W] (N >= 2); a scalar tensor."""
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"need at least 2 images [N, 3, H, W] to measure diversity, got shape {tuple(images.shape)}")
    pairs = list(combinations(range(len(images)), 2))
    first = images[[i for i, _ in pairs]]
    second = images[[j for _, j in pairs]]
    return distance(first, second).float().mean()


def diversity_by_prompt(images: torch.Tensor, prompts: Sequence[str], distance: Distance | None = None) -> dict:
    """``{"mean": float, "per_prompt": {prompt: float}}``: mean pairwise distance among images sharing a prompt.

    ``images``: [N, 3, H, W] in [0, 1]; ``prompts``: N strings (several seeds per prompt).
    ``distance`` defaults to ``lpips_distance()``. Prompts with a single image are an error.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    lonely = [p for p, idx in groups.items() if len(idx) < 2]
    if lonely:
        raise ValueError(f"diversity needs >= 2 images per prompt; only one for {lonely[:3]}")
    distance = distance or lpips_distance()
    per_prompt = {prompt: float(mean_pairwise_distance(images[idx], distance)) for prompt, idx in groups.items()}
    return {"mean": sum(per_prompt.values()) / len(per_prompt), "per_prompt": per_prompt}
