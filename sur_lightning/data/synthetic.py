"""A generated, offline stand-in for SURD: coloured shapes in given counts.

Each image shows ``count`` non-overlapping shapes of one colour and one kind on a light
background. Its simple prompt is short and narrative ("three red circles"); its complex
prompt spells out what the image shows in the detailed style of SURD's complex prompts.
The folder follows the SURD layout: ``train/*.png`` plus ``train/metadata.jsonl`` with rows
``{"file_name", "text" (simple prompt), "prompt" (complex prompt)}``. Deterministic by seed.

    python -m sur_lightning.data.synthetic --out data/shapes --num-images 256
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

# Saturated colours far apart in RGB *and* hue: yellow/orange and red/purple neighbours are where a
# model's (and a per-pixel checker's) colour errors go, so every pair is at least ~120 apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (25, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (250, 225, 25),
    "purple": (130, 40, 190),
    "orange": (245, 115, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_COUNT = 5
# Pixels kept free between shapes: after the VAE's x4 compression closer shapes merge into one blob.
MIN_GAP = 4


def plural(kind: str, count: int) -> str:
    return kind if count == 1 else f"{kind}s"


def simple_prompt(count: int, color: str, kind: str) -> str:
    return f"{NUMBER_WORDS[count]} {color} {plural(kind, count)}"


def complex_prompt(count: int, color: str, kind: str) -> str:
    noun = plural(kind, count)
    verb = "is" if count == 1 else "are"
    outline = {"circle": "round", "square": "four straight equal sides", "triangle": "three straight sides"}[kind]
    return (
        f"A clean flat illustration on a plain white background showing exactly {NUMBER_WORDS[count]} "
        f"solid {color} {noun}. The {noun} {verb} drawn with {outline}, evenly lit, "
        f"well separated from each other, with no other objects in the scene."
    )


def shape_outline(kind: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """The polygon of a triangle (apex up) in ``box``; circles and squares are drawn from the box itself."""
    x0, y0, x1, y1 = box
    return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]


def place_boxes(count: int, side: int, size: int, gap: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """``count`` random square boxes of ``side`` px, at least ``gap`` px apart, inside a ``size`` px image."""
    margin = 2

    def apart(a, b) -> bool:
        return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]

    # Start the whole layout again when a box finds no room: early boxes can block the rest.
    for _layout in range(200):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            for _attempt in range(50):
                x0 = rng.randint(margin, size - side - margin)
                y0 = rng.randint(margin, size - side - margin)
                box = (x0, y0, x0 + side - 1, y0 + side - 1)
                if all(apart(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            return boxes
    raise RuntimeError(f"cannot place {count} shapes of side {side} {gap}px apart in a {size}px image")


def draw_shapes(
    count: int,
    color: str,
    kind: str,
    size: int,
    rng: random.Random,
    side: int | None = None,
    gap: int = MIN_GAP,
    background: tuple[int, int, int] = BACKGROUND,
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Draw ``count`` shapes of side ``side`` (default size // 5) at least ``gap`` pixels apart.

    Returns the image and the shapes' boxes (x0, y0, x1, y1), both ends inclusive as PIL draws them.
    """
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    side = side or max(4, size // 5)
    boxes = place_boxes(count, side, size, gap, rng)
    for box in boxes:
        if kind == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif kind == "square":
            draw.rectangle(box, fill=COLORS[color])
        elif kind == "triangle":
            draw.polygon(shape_outline(kind, box), fill=COLORS[color])
        else:
            raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    return image, boxes


def generate_dataset(out: str | Path, num_images: int = 64, image_size: int = 64, seed: int = 0) -> Path:
    """Write ``num_images`` images and ``metadata.jsonl`` into ``out/train``; returns that folder.

    Reuses an existing folder when it already holds exactly this dataset (same manifest).
    """
    train = Path(out) / "train"
    manifest = {"num_images": num_images, "image_size": image_size, "seed": seed}
    manifest_file = train / "manifest.json"
    if manifest_file.exists() and json.loads(manifest_file.read_text()) == manifest:
        return train
    train.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(num_images):
        count = rng.randint(1, MAX_COUNT)
        color = rng.choice(sorted(COLORS))
        kind = rng.choice(SHAPES)
        image, _ = draw_shapes(count, color, kind, image_size, rng)
        file_name = f"{index:06d}.png"
        image.save(train / file_name)
        rows.append(
            {
                "file_name": file_name,
                "text": simple_prompt(count, color, kind),
                "prompt": complex_prompt(count, color, kind),
            }
        )
    with open(train / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    manifest_file.write_text(json.dumps(manifest))
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = generate_dataset(args.out, args.num_images, args.image_size, args.seed)
    print(f"wrote {args.num_images} images to {folder}")


if __name__ == "__main__":
    main()
