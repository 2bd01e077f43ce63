"""The toy world: images of 1-3 coloured shapes, complex prompts that name what they show, and simple
narrative prompts that need world knowledge to draw.

- **Complex prompts** are the base model's whole vocabulary: "two red circles" (count word, colour,
  shape). The base is trained on these alone (``sur_lightning.toyworld.pretrain``).
- **Simple prompts** name everyday objects: "a pair of tomatoes on a table" means two red circles.
  ``OBJECTS`` maps each object word to its colour and shape, ``QUANTITIES`` maps quantity phrases to
  counts, ``TEMPLATES`` put them in a sentence.
- **Splits**, deterministic from one seed (``make_splits``):
  adapter-train — (object, count) combinations connectors are trained on;
  held-out combinations — an object and a quantity both seen in training, but never together. Every
  word of these prompts occurs in some adapter-train prompt (the singular with "a single", the plural
  with the other plural count), so this tests composition and not unseen tokens;
  held-out objects — object words that occur in no adapter-train prompt. Only a connector that reads
  the LLM at inference time can get these right.

``write_world`` writes the adapter-train dataset in the SURD layout (``adapter_train/metadata.jsonl``
with ``text`` = simple and ``prompt`` = complex prompt), one prompt suite per split
(``suites/<split>.jsonl``, each row with its target count, colour and shape), and ``manifest.json``, into a
folder of ``out`` named by its settings (``data/toyworld/seed0_n16_64px``): worlds of other split seeds
never share or rewrite each other's files.

    python -m sur_lightning.toyworld.world --out data/toyworld

``parse_toyworld(text)`` reads the (count, colour, shape) a text names; ``toyworld_accuracy`` scores an LLM's
rewrites by it (``python -m sur_lightning.rewrite``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from sur_lightning.data.synthetic import COLORS, SHAPES, draw_shapes, simple_prompt

IMAGE_SIZE = 64
SHAPE_SIDE = 18  # px at 64 px: about 4-5 latent pixels after the VAE's x4 compression
COUNTS = (1, 2, 3)
SPLITS = ("adapter_train", "held_out_combinations", "held_out_objects")


@dataclass(frozen=True)
class WorldObject:
    """An everyday object word and what it looks like in the toy world."""

    name: str
    plural: str
    color: str
    shape: str

    def noun(self, count: int) -> str:
        return self.name if count == 1 else self.plural


# Objects whose colour an LLM can know. Shapes follow the object's outline where it has one (round
# fruit, square gems and bricks, pointed cones and wedges).
OBJECTS: tuple[WorldObject, ...] = (
    WorldObject("tomato", "tomatoes", "red", "circle"),
    WorldObject("cherry", "cherries", "red", "circle"),
    WorldObject("lime", "limes", "green", "circle"),
    WorldObject("pea", "peas", "green", "circle"),
    WorldObject("lemon", "lemons", "yellow", "circle"),
    WorldObject("blueberry", "blueberries", "blue", "circle"),
    WorldObject("plum", "plums", "purple", "circle"),
    WorldObject("grape", "grapes", "purple", "circle"),
    WorldObject("orange", "oranges", "orange", "circle"),
    WorldObject("pumpkin", "pumpkins", "orange", "circle"),
    WorldObject("brick", "bricks", "red", "square"),
    WorldObject("ruby", "rubies", "red", "square"),
    WorldObject("emerald", "emeralds", "green", "square"),
    WorldObject("sapphire", "sapphires", "blue", "square"),
    WorldObject("amethyst", "amethysts", "purple", "square"),
    WorldObject("sponge", "sponges", "yellow", "square"),
    WorldObject("nacho", "nachos", "yellow", "triangle"),
    WorldObject("pine tree", "pine trees", "green", "triangle"),
    WorldObject("traffic cone", "traffic cones", "orange", "triangle"),
    WorldObject("strawberry", "strawberries", "red", "triangle"),
)
OBJECTS_BY_NAME = {obj.name: obj for obj in OBJECTS}
QUANTITIES: dict[int, str] = {1: "a single", 2: "a pair of", 3: "a trio of"}
TEMPLATES: tuple[str, ...] = (
    "{quantity} {noun}",
    "{quantity} {noun} on a table",
    "a photo of {quantity} {noun}",
    "a drawing of {quantity} {noun}",
)
NUM_HELD_OUT_OBJECTS = 4


def complex_prompt(count: int, color: str, shape: str) -> str:
    """The base model's vocabulary: "two red circles"."""
    return simple_prompt(count, color, shape)


def narrative_prompt(obj: WorldObject, count: int, template: int = 0) -> str:
    """A simple prompt that needs world knowledge: "a pair of tomatoes on a table"."""
    return TEMPLATES[template % len(TEMPLATES)].format(quantity=QUANTITIES[count], noun=obj.noun(count))


@dataclass(frozen=True)
class Splits:
    """(object name, count) combinations of each split, and the held-out object names."""

    seed: int
    adapter_train: tuple[tuple[str, int], ...]
    held_out_combinations: tuple[tuple[str, int], ...]
    held_out_objects: tuple[tuple[str, int], ...]

    def combos(self, split: str) -> tuple[tuple[str, int], ...]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)


def make_splits(seed: int = 0, num_held_out_objects: int = NUM_HELD_OUT_OBJECTS) -> Splits:
    """Deterministic splits from ``seed`` (see the module docstring).

    Held-out objects are drawn so that every colour and shape they show is still shown by some
    training object. Each training object keeps its singular ("a single tomato") and one plural
    count for training; its other plural count is a held-out combination, so the plural word form
    is seen in training, and both "a pair of" and "a trio of" are seen with other objects.
    """
    rng = random.Random(seed)
    names = [obj.name for obj in OBJECTS]
    for _attempt in range(1000):
        held_objects = sorted(rng.sample(names, num_held_out_objects))
        train_objects = [OBJECTS_BY_NAME[n] for n in names if n not in held_objects]
        if all(
            any(t.color == OBJECTS_BY_NAME[h].color for t in train_objects)
            and any(t.shape == OBJECTS_BY_NAME[h].shape for t in train_objects)
            for h in held_objects
        ):
            break
    else:  # pragma: no cover - only with a lexicon that cannot be split
        raise RuntimeError("cannot hold out objects whose colours and shapes all stay in training")
    train, held_combos = [], []
    for obj in train_objects:
        held_count = rng.choice((2, 3))
        train += [(obj.name, 1), (obj.name, 5 - held_count)]
        held_combos.append((obj.name, held_count))
    trained_counts = {count for _, count in train}
    if trained_counts != set(COUNTS):  # pragma: no cover - needs an unlucky seed and very few objects
        raise RuntimeError(f"seed {seed}: quantities {set(COUNTS) - trained_counts} never occur in adapter-train")
    held_out = [(name, count) for name in held_objects for count in COUNTS]
    return Splits(seed, tuple(train), tuple(held_combos), tuple(held_out))


def suite_rows(splits: Splits, split: str) -> list[dict]:
    """One evaluation prompt per (combination, template) of ``split``: ``{id, prompt, category,
    complex, count, color, shape, object}``."""
    rows = []
    for name, count in splits.combos(split):
        obj = OBJECTS_BY_NAME[name]
        for template in range(len(TEMPLATES)):
            rows.append(
                {
                    "id": f"{split}-{name.replace(' ', '_')}-{count}-t{template}",
                    "prompt": narrative_prompt(obj, count, template),
                    "category": split,
                    "complex": complex_prompt(count, obj.color, obj.shape),
                    "count": count,
                    "color": obj.color,
                    "shape": obj.shape,
                    "object": name,
                }
            )
    return rows


def prompt_object(prompt_id: str) -> str:
    """The object an evaluation prompt names, from its id (``held_out_objects-pine_tree-2-t0`` -> "pine tree")."""
    parts = prompt_id.split("-")
    if len(parts) != 4 or parts[0] not in SPLITS or parts[1].replace("_", " ") not in OBJECTS_BY_NAME:
        raise ValueError(f"{prompt_id!r} is not a toy-world prompt id (<split>-<object>-<count>-t<template>)")
    return parts[1].replace("_", " ")


def draw_example(count: int, color: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """One world image: ``count`` shapes of one colour and kind, at least 4 px apart."""
    image, _ = draw_shapes(count, color, shape, size, rng, side=SHAPE_SIDE * size // IMAGE_SIZE)
    return image


def all_targets() -> list[tuple[int, str, str]]:
    """Every (count, colour, shape) the world draws (3 x 6 x 3 = 54), in a fixed order."""
    return [(count, color, shape) for count in COUNTS for color in sorted(COLORS) for shape in SHAPES]


def random_complex_example(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, str, tuple[int, str, str]]:
    """A uniformly random (count, colour, shape): its image, complex prompt and target."""
    target = (rng.choice(COUNTS), rng.choice(sorted(COLORS)), rng.choice(SHAPES))
    return draw_example(*target, rng, size), complex_prompt(*target), target


def world_folder(out: str | Path, seed: int = 0, images_per_combo: int = 16, image_size: int = IMAGE_SIZE) -> Path:
    """The folder of ``out`` that holds the world of these settings: ``out/seed<seed>_n<images>_<size>px``."""
    return Path(out) / f"seed{seed}_n{images_per_combo}_{image_size}px"


def write_world(out: str | Path, seed: int = 0, images_per_combo: int = 16, image_size: int = IMAGE_SIZE) -> Path:
    """Write the world into ``world_folder(out, ...)`` (once; reused when its manifest matches) and return that folder.

    ``adapter_train/``: ``images_per_combo`` images per adapter-train combination, SURD layout;
    ``suites/<split>.jsonl``: the evaluation prompts of each split with their targets;
    ``manifest.json``: the settings and every split's combinations (written last: a world with it is whole).
    Two processes asking for the same world at once: one writes it, the other waits for the lock and reuses it.
    """
    from filelock import FileLock

    folder = world_folder(out, seed, images_per_combo, image_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(folder.name + ".lock")):
        return write_world_unlocked(folder, seed, images_per_combo, image_size)


def write_world_unlocked(out: Path, seed: int, images_per_combo: int, image_size: int) -> Path:
    splits = make_splits(seed)
    settings = {"seed": seed, "images_per_combo": images_per_combo, "image_size": image_size, "version": 1}
    manifest_file = out / "manifest.json"
    if manifest_file.exists() and json.loads(manifest_file.read_text()).get("settings") == settings:
        return out
    train_dir = out / "adapter_train"
    train_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"images-{seed}")
    rows = []
    for name, count in splits.adapter_train:
        obj = OBJECTS_BY_NAME[name]
        for index in range(images_per_combo):
            file_name = f"{name.replace(' ', '_')}-{count}-{index:03d}.png"
            draw_example(count, obj.color, obj.shape, rng, image_size).save(train_dir / file_name)
            rows.append(
                {
                    "file_name": file_name,
                    "text": narrative_prompt(obj, count, index),
                    "prompt": complex_prompt(count, obj.color, obj.shape),
                    "count": count,
                    "color": obj.color,
                    "shape": obj.shape,
                    "object": name,
                }
            )
    (train_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    suites = out / "suites"
    suites.mkdir(exist_ok=True)
    for split in SPLITS:
        lines = "".join(json.dumps(r) + "\n" for r in suite_rows(splits, split))
        (suites / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    manifest = {
        "settings": settings,
        "splits": {split: [list(c) for c in splits.combos(split)] for split in SPLITS},
        "objects": [asdict(obj) for obj in OBJECTS],
        "quantities": QUANTITIES,
        "templates": list(TEMPLATES),
    }
    manifest_file.write_text(json.dumps(manifest, indent=2))
    return out


def adapter_train_folder(out: str | Path, seed: int = 0, images_per_combo: int = 16) -> str:
    """``write_world`` and return its adapter-train dataset folder (for ``data.root``)."""
    return str(write_world(out, seed, images_per_combo) / "adapter_train")


def suite_file(out: str | Path, split: str, seed: int = 0, images_per_combo: int = 16) -> str:
    """``write_world`` and return the prompt suite of ``split`` (for ``prompts=``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return str(write_world(out, seed, images_per_combo) / "suites" / f"{split}.jsonl")


def suite(out: str | Path, splits=SPLITS, seed: int = 0, images_per_combo: int = 16, per_split: int | None = None):
    """The evaluation prompts (``Prompt`` with ``complex`` and ``target``) of ``splits``, category = split.
    ``per_split`` keeps N prompts of each split, evenly spread over its combinations and templates."""
    from sur_lightning.data.prompt_suites import load_jsonl

    prompts = []
    for split in [splits] if isinstance(splits, str) else list(splits):
        rows = load_jsonl(suite_file(out, split, seed, images_per_combo))
        if per_split:
            # Rows come grouped by combination, one per template: step over combinations, turn templates.
            picks = [min(len(rows) - 1, int(i * len(rows) / per_split) + i % len(TEMPLATES)) for i in range(per_split)]
            rows = [rows[i] for i in dict.fromkeys(picks)]
        prompts += rows
    return prompts


# ------------------------------------------------------------------ reading what a text names


def parse_toyworld(text: str) -> tuple[int | None, str | None, str | None]:
    """(count, colour, shape) named in a text, each None when absent or ambiguous (two colours named)."""
    import re

    from sur_lightning.data.synthetic import COLORS, NUMBER_WORDS, SHAPES

    words = re.findall(r"[a-z]+", text.lower())

    def only(found: set):
        return found.pop() if len(found) == 1 else None

    colors = {w for w in words if w in COLORS}
    shapes = {s for s in SHAPES for w in words if w in (s, s + "s")}
    counts = {NUMBER_WORDS.index(w) for w in words if w in NUMBER_WORDS[1:4]}
    return only(counts), only(colors), only(shapes)


def toyworld_accuracy(rewrites: Sequence[str], targets: Sequence[tuple[int, str, str]]) -> dict[str, float]:
    """Share of rewrites whose parse names the target's count, colour and shape."""
    parsed = [parse_toyworld(r) for r in rewrites]
    n = max(len(parsed), 1)
    return {
        name: sum(p[i] == t[i] for p, t in zip(parsed, targets)) / n
        for i, name in enumerate(("count_named", "color_named", "shape_named"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-combo", type=int, default=16)
    args = parser.parse_args()
    out = write_world(args.out, args.seed, args.images_per_combo)
    manifest = json.loads((out / "manifest.json").read_text())
    for split, combos in manifest["splits"].items():
        print(f"{split}: {len(combos)} combinations")
    print(f"wrote the world to {out}")


if __name__ == "__main__":
    main()
