"""Semantic accuracy on generated shapes (``sur_lightning.data.synthetic`` and the toy world).

A prompt such as "three red circles" asks for a count, a colour and a kind of shape. This
checker reads those back from an image with no learned model:

1. foreground: a pixel farther than ``foreground_threshold`` (Euclidean RGB) from the background
   colour belongs to some shape; split the foreground into connected components (4-connectivity)
   and drop those smaller than ``min_area`` pixels as specks;
2. colour: the palette colour nearest to a component's *median* RGB (``None`` when none is within
   ``tolerance``). Deciding per component rather than per pixel keeps anti-aliased or VAE-blurred
   edges, whose pixels sit between two palette colours, from splitting one shape into two;
3. shape: the ideal disc, square and apex-up triangle inscribed in the component's bounding box are
   rasterised, and the one with the highest IoU against the component wins.

On images drawn by ``draw_shapes`` and on their VAE reconstructions every answer is (nearly) exact;
on generated images it measures whether the model drew the right number of objects of the right
colour and shape.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from sur_lightning.data.synthetic import BACKGROUND, COLORS, NUMBER_WORDS, SHAPES

try:  # scipy labels components in C; the BFS below is the fallback.
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - depends on the environment
    _ndimage = None

DEFAULT_TOLERANCE = 100.0
DEFAULT_FOREGROUND_THRESHOLD = 60.0
DEFAULT_MIN_AREA = 4

_PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # [C, 3]
_NUMBERS = {word: n for n, word in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1}


def to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """Return an image as a uint8 array [H, W, 3].

    Accepts a PIL image, a uint8 array [H, W, 3], or a float tensor [3, H, W] in [0, 1].
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a tensor [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an array [H, W, 3], got shape {array.shape}")
    return array.astype(np.uint8)


def foreground_mask(rgb: np.ndarray, threshold: float = DEFAULT_FOREGROUND_THRESHOLD) -> np.ndarray:
    """bool [H, W]: pixels of ``rgb`` [H, W, 3] farther than ``threshold`` from the background colour."""
    distance = np.linalg.norm(rgb.astype(np.float32) - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    return distance > threshold


def nearest_color(rgb: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> str | None:
    """The palette colour nearest to one RGB value [3], or None when none lies within ``tolerance``."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32)[None], axis=-1)
    index = int(distances.argmin())
    return _PALETTE_NAMES[index] if distances[index] <= tolerance else None


def _components_bfs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask [H, W]: (labels [H, W] with 0 = none, count)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask [H, W]: (labels [H, W] with 0 = none, count)."""
    if _ndimage is not None:
        labels, count = _ndimage.label(mask)
        return labels, int(count)
    return _components_bfs(mask)


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal masks [height, width] of each shape filling a box of that size."""
    ys = (np.arange(height) + 0.5)[:, None] / height  # pixel centres in (0, 1)
    xs = (np.arange(width) + 0.5)[None, :] / width
    disc = (ys - 0.5) ** 2 + (xs - 0.5) ** 2 <= 0.25
    triangle = np.abs(xs - 0.5) <= ys / 2  # apex at the top centre, base along the bottom edge
    return {"circle": disc, "square": np.ones((height, width), bool), "triangle": triangle}


def classify_component(component: np.ndarray) -> str:
    """The shape ("circle", "square" or "triangle") whose ideal mask in the component's bounding box
    overlaps the component [H, W] (bool) with the highest IoU."""
    ys, xs = np.nonzero(component)
    crop = component[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    ious = {}
    for kind, template in _templates(*crop.shape).items():
        ious[kind] = (crop & template).sum() / (crop | template).sum()
    return max(SHAPES, key=lambda kind: ious[kind])


def detect_shapes(
    image: Image.Image | np.ndarray | torch.Tensor,
    tolerance: float = DEFAULT_TOLERANCE,
    min_area: int = DEFAULT_MIN_AREA,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
) -> list[tuple[str | None, str]]:
    """Every shape found in one image as ``(color or None, kind)``, in scan order."""
    rgb = to_rgb_array(image)
    components, n = connected_components(foreground_mask(rgb, foreground_threshold))
    found = []
    for k in range(1, n + 1):
        component = components == k
        if component.sum() < min_area:
            continue
        found.append((nearest_color(np.median(rgb[component], axis=0), tolerance), classify_component(component)))
    return found


def count_shapes(image: Image.Image | np.ndarray | torch.Tensor, **detect_kwargs) -> dict[tuple[str | None, str], int]:
    """Count the shapes in one image: ``{(color, kind): count}``, only non-zero entries.

    ``image``: PIL, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1].
    """
    return dict(Counter(detect_shapes(image, **detect_kwargs)))


def parse_prompt(prompt: str) -> tuple[int, str, str]:
    """Read ``(count, color, kind)`` from a simple prompt: "three red circles" -> (3, "red", "circle").

    The count is a number word ("zero".."six", "a"/"an") or digits; the kind may be plural.
    Raises ``ValueError`` for a prompt that is not of that form.
    """
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    if len(words) != 3:
        raise ValueError(f"cannot parse {prompt!r}: expected '<count> <color> <shape>', e.g. 'three red circles'")
    count_word, color, noun = words
    count = int(count_word) if count_word.isdigit() else _NUMBERS.get(count_word)
    kind = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    if count is None or color not in COLORS or kind not in SHAPES:
        raise ValueError(
            f"cannot parse {prompt!r}: count must be a number word or digits, colour one of {sorted(COLORS)}, "
            f"shape one of {list(SHAPES)}"
        )
    return count, color, kind


def check(
    image: Image.Image | np.ndarray | torch.Tensor,
    prompt: str | None = None,
    target: tuple[int, str, str] | None = None,
    **detect_kwargs,
) -> dict[str, bool]:
    """Judge one image against what it should show: ``target`` = (count, color, kind), or read from a
    complex ``prompt`` such as "three red circles" (narrative prompts need their target given).

    Returns ``{"count", "color", "shape", "exact"}``: the number of detected shapes equals the count;
    at least one shape was found and every one has the target's colour; likewise its kind; and the
    detection is exactly ``{(color, kind): count}``.
    """
    if target is None:
        if prompt is None:
            raise ValueError("check needs a prompt or a target (count, color, kind)")
        target = parse_prompt(prompt)
    count, color, kind = target
    found = count_shapes(image, **detect_kwargs)
    return {
        "count": sum(found.values()) == count,
        "color": bool(found) and all(c == color for c, _ in found),
        "shape": bool(found) and all(k == kind for _, k in found),
        "exact": found == ({(color, kind): count} if count else {}),
    }


def score(
    images: Sequence[Image.Image | np.ndarray | torch.Tensor] | torch.Tensor, prompts: Sequence[str], **detect_kwargs
) -> dict[str, float]:
    """Mean accuracies over a batch: ``{count_accuracy, color_accuracy, shape_accuracy, exact}`` in [0, 1].

    ``images``: a list (PIL / arrays [H, W, 3] / tensors [3, H, W]) or a tensor [B, 3, H, W] in
    [0, 1]; ``prompts``: B simple prompts. See ``check`` for what each accuracy counts.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("score needs at least one image")
    results = [check(image, prompt, **detect_kwargs) for image, prompt in zip(images, prompts)]
    n = len(results)
    return {
        "count_accuracy": sum(r["count"] for r in results) / n,
        "color_accuracy": sum(r["color"] for r in results) / n,
        "shape_accuracy": sum(r["shape"] for r in results) / n,
        "exact": sum(r["exact"] for r in results) / n,
    }
