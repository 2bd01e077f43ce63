"""A generated, offline stand-in for SURD: coloured shapes in given counts.

Each image shows ``count`` non-overlapping shapes of one colour and one kind on a white
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

# Saturated colours far apart in RGB, so a checker can recover them by nearest colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square")
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_COUNT = 5


def plural(kind: str, count: int) -> str:
    return kind if count == 1 else f"{kind}s"


def simple_prompt(count: int, color: str, kind: str) -> str:
    return f"{NUMBER_WORDS[count]} {color} {plural(kind, count)}"


def complex_prompt(count: int, color: str, kind: str) -> str:
    noun = plural(kind, count)
    verb = "is" if count == 1 else "are"
    outline = "round" if kind == "circle" else "four straight equal sides"
    return (
        f"A clean flat illustration on a plain white background showing exactly {NUMBER_WORDS[count]} "
        f"solid {color} {noun}. The {noun} {verb} drawn with {outline}, evenly lit, "
        f"well separated from each other, with no other objects in the scene."
    )


def draw_shapes(
    count: int, color: str, kind: str, size: int, rng: random.Random
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Draw ``count`` non-overlapping shapes; returns the image and their boxes (x0, y0, x1, y1)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    side = max(4, size // 5)
    margin = 2
    for _ in range(count):
        for _attempt in range(500):
            x0 = rng.randint(margin, size - side - margin)
            y0 = rng.randint(margin, size - side - margin)
            box = (x0, y0, x0 + side, y0 + side)
            # Keep a one-pixel gap so the shapes stay separate connected components.
            if all(box[2] + 1 < b[0] or b[2] + 1 < box[0] or box[3] + 1 < b[1] or b[3] + 1 < box[1] for b in boxes):
                break
        else:
            raise RuntimeError(f"cannot place {count} shapes of side {side} in a {size}px image")
        boxes.append(box)
        if kind == "circle":
            draw.ellipse(box, fill=COLORS[color])
        else:
            draw.rectangle(box, fill=COLORS[color])
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
        rows.append({"file_name": file_name, "text": simple_prompt(count, color, kind), "prompt": complex_prompt(count, color, kind)})
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
