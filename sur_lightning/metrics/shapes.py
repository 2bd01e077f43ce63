"""Semantic accuracy on the generated shapes dataset (``sur_lightning.data.synthetic``).

A prompt such as "three red circles" asks for a count, a colour and a kind of shape. This
checker reads those back from an image with no learned model:

1. every pixel takes the nearest colour among the palette ``COLORS`` plus the white
   background; a pixel farther than ``tolerance`` (Euclidean RGB) from all of them is ignored;
2. each palette colour's mask is split into connected components (4-connectivity), and
   components smaller than ``min_area`` pixels are dropped as specks;
3. a component is a circle or a square by how much of its bounding box it fills: a disc fills
   π/4 ≈ 0.785, a square 1.0; the threshold sits between them (``fill_threshold``).

On images drawn by ``draw_shapes`` every answer is exact; on generated images it measures
whether the model drew the right number of objects of the right colour and shape.
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

DEFAULT_TOLERANCE = 60.0
DEFAULT_FILL_THRESHOLD = (np.pi / 4 + 1.0) / 2  # ≈ 0.893, halfway between a disc and a square
DEFAULT_MIN_AREA = 4

_PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES] + [BACKGROUND], dtype=np.float32)  # [C+1, 3]
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


def palette_labels(rgb: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Label each pixel of ``rgb`` [H, W, 3] with its nearest palette colour.

    Returns int [H, W]: an index into ``COLORS`` (in insertion order), ``len(COLORS)`` for the
    white background, or -1 where no palette colour lies within ``tolerance``.
    """
    distances = np.linalg.norm(rgb[:, :, None, :].astype(np.float32) - _PALETTE[None, None], axis=-1)  # [H, W, C+1]
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > tolerance] = -1
    return labels


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


def classify_component(component: np.ndarray, fill_threshold: float = DEFAULT_FILL_THRESHOLD) -> str:
    """ "circle" or "square" for one component, a bool mask [H, W], by its bounding-box fill ratio."""
    ys, xs = np.nonzero(component)
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return "square" if len(ys) / box_area >= fill_threshold else "circle"


def count_shapes(
    image: Image.Image | np.ndarray | torch.Tensor,
    tolerance: float = DEFAULT_TOLERANCE,
    min_area: int = DEFAULT_MIN_AREA,
    fill_threshold: float = DEFAULT_FILL_THRESHOLD,
) -> dict[tuple[str, str], int]:
    """Count the shapes in one image: ``{(color, kind): count}``, only non-zero entries.

    ``image``: PIL, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1].
    """
    labels = palette_labels(to_rgb_array(image), tolerance)
    counts: Counter[tuple[str, str]] = Counter()
    for index, color in enumerate(_PALETTE_NAMES):
        mask = labels == index
        if not mask.any():
            continue
        components, n = connected_components(mask)
        for k in range(1, n + 1):
            component = components == k
            if component.sum() >= min_area:
                counts[(color, classify_component(component, fill_threshold))] += 1
    return dict(counts)


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


def check(image: Image.Image | np.ndarray | torch.Tensor, prompt: str, **count_kwargs) -> dict[str, bool]:
    """Judge one image against its prompt.

    Returns ``{"count", "color", "shape", "exact"}``: the total number of detected shapes equals
    the prompt's count; at least one shape was found and every one has the prompt's colour;
    likewise its kind; and the detection is exactly ``{(color, kind): count}``.
    """
    count, color, kind = parse_prompt(prompt)
    found = count_shapes(image, **count_kwargs)
    return {
        "count": sum(found.values()) == count,
        "color": bool(found) and all(c == color for c, _ in found),
        "shape": bool(found) and all(k == kind for _, k in found),
        "exact": found == ({(color, kind): count} if count else {}),
    }


def score(
    images: Sequence[Image.Image | np.ndarray | torch.Tensor] | torch.Tensor, prompts: Sequence[str], **count_kwargs
) -> dict[str, float]:
    """Mean accuracies over a batch: ``{count_accuracy, color_accuracy, shape_accuracy, exact}`` in [0, 1].

    ``images``: a list (PIL / arrays [H, W, 3] / tensors [3, H, W]) or a tensor [B, 3, H, W] in
    [0, 1]; ``prompts``: B simple prompts. See ``check`` for what each accuracy counts.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("score needs at least one image")
    results = [check(image, prompt, **count_kwargs) for image, prompt in zip(images, prompts)]
    n = len(results)
    return {
        "count_accuracy": sum(r["count"] for r in results) / n,
        "color_accuracy": sum(r["color"] for r in results) / n,
        "shape_accuracy": sum(r["shape"] for r in results) / n,
        "exact": sum(r["exact"] for r in results) / n,
    }
