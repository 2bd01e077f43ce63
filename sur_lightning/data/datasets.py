"""Datasets: rows of (image, simple prompt, complex prompt), map-style or streamed, and their collation.

An example is a dict ``pixel_values`` [3, R, R] in [-1, 1] (or, with a latent store, ``latent_mean`` and
``latent_logvar`` [4, R/f, R/f]; or, from a code database, ``codes`` [G, G] int64: ``code_lmdb.py``),
``original_size`` and ``crop_top_left`` [2] (not from stores made for SD1.x/2.x: only SDXL reads them),
``simple_prompt``, ``complex_prompt``, ``id`` (and ``rewrite_prompt`` when the rewriter wrote one); ``collate``
stacks them into the batches ``datamodule.py`` documents.
``preprocess`` is diffusers' text-to-image preprocessing; ``content_hash`` and ``image_variants`` name what
the feature cache stores per image.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms import functional as TF

from sur_lightning.data.formats import Row, table_image_bytes, webdataset_row
from sur_lightning.data.images import MAX_IMAGE_PIXELS, BadImage, load_rgb
from sur_lightning.data.report import DataReport


class CacheMissError(KeyError):
    """``data.cache=require`` and an entry is missing; the message names the entry's key and row."""


def content_hash(data: bytes | str) -> str:
    """sha256 of image bytes or prompt text: the content half of a cache key."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


# Each image's size before resizing and its crop, [2] each: SDXL's micro-conditioning (``preprocess_with_geometry``).
GEOMETRY = ("original_size", "crop_top_left")


def image_variants(random_flip: bool) -> tuple[str, ...]:
    """The crop/flip variants training uses (and the cache stores) per image."""
    return ("center", "center_flip") if random_flip else ("center",)


def preprocess(image, resolution: int, center_crop: bool, flip: bool, rng=random) -> torch.Tensor:
    """diffusers' text-to-image preprocessing: resize the short side, crop, flip, scale to [-1, 1]. [3, R, R]

    ``rng`` (a ``random.Random``, or the module) places a random crop."""
    return preprocess_with_geometry(image, resolution, center_crop, flip, rng)[0]


def preprocess_with_geometry(
    image, resolution: int, center_crop: bool, flip: bool, rng=random
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``preprocess`` and what SDXL's micro-conditioning reads of it: ``original_size`` (height, width) before
    resizing and ``crop_top_left`` (top, left) in the resized image, in the flipped image when flipped, as
    diffusers' SDXL training script records them. Each an int64 tensor [2]."""
    original = (image.height, image.width)
    image = TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR)
    if center_crop:
        top = round((image.height - resolution) / 2.0)
        left = round((image.width - resolution) / 2.0)
    else:
        top = rng.randint(0, image.height - resolution)
        left = rng.randint(0, image.width - resolution)
    width = image.width
    image = TF.crop(image, top, left, resolution, resolution)
    if flip:
        image = TF.hflip(image)
        # The script flips before cropping: the same pixels, cropped from the mirrored side.
        left = width - resolution - left
    geometry = {"original_size": torch.tensor(original), "crop_top_left": torch.tensor((top, left))}
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5]), geometry


class PromptLimit:
    """Cuts prompts longer than the tokenizer's limit at a word boundary, so the report can count them.

    The text encoder would truncate them anyway; cutting here makes it visible and keeps 10k-character
    prompts out of every training step.
    """

    def __init__(self, tokenizer: str | None, subfolder: str = "tokenizer") -> None:
        self.tokenizer = None
        self.max_tokens = None
        if tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), subfolder=subfolder, use_fast=False)
            self.max_tokens = int(self.tokenizer.model_max_length)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    def __call__(self, text: str) -> tuple[str, int | None]:
        """(text, None) when it fits; else (its longest word prefix that fits, its full token count)."""
        # A token covers at least one character, so a short prompt cannot exceed the limit.
        if self.tokenizer is None or len(text) <= self.max_tokens - 2:
            return text, None
        total = self.count(text)
        if total <= self.max_tokens:
            return text, None
        words = text.split()
        low, high = 0, len(words)
        while low < high:
            middle = (low + high + 1) // 2
            if self.count(" ".join(words[:middle])) <= self.max_tokens:
                low = middle
            else:
                high = middle - 1
        return " ".join(words[:low]), total


def check_prompts(row: Row, limit: PromptLimit, report: DataReport, simple_key: str | None, complex_key: str) -> bool:
    """Skip a row with a missing or empty prompt; truncate over-long ones (counted). True when the row is usable."""
    for field, key in (("simple", simple_key or "simple prompt source"), ("complex", complex_key)):
        text = getattr(row, field)
        if text is None:
            report.skip(row.where, row.id, f"missing {field} prompt ({key!r})")
            return False
        if not text.strip():
            report.skip(row.where, row.id, f"empty {field} prompt ({key!r})")
            return False
        cut, total = limit(text)
        if total is not None:
            report.truncate(row.where, row.id, f"{field} prompt: {total} tokens cut to {limit.max_tokens}")
            setattr(row, field, cut)
    return True


class ImageTextDataset(Dataset):
    """Map-style rows; ``image_bytes`` reads a file under ``root`` or a cell of ``table``.

    With a latent store (``data.cache`` on), an image whose latents are cached is not decoded at all.
    Indexed by ``EpochSampler`` with (epoch, index), a row's flip and crop are drawn from a generator keyed
    by (seed, epoch, row id), so a resumed run, or another number of workers or ranks, draws the same ones.

    ``renamer`` (a ``sur_lightning.knowledge.name_dropout.NameDropout``) with ``name_dropout`` p > 0: with probability p the
    row's simple prompt is replaced by one of its renamed variants, drawn from its own generator keyed by
    the same (seed, epoch, row id) (so the flip draws are the ones without name dropout).
    """

    def __init__(
        self,
        rows: list[Row],
        root: Path | None,
        table,
        image_key: str,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        min_image_side: int = 8,
        latent_store=None,
        cache: str = "off",
        seed: int = 0,
        renamer=None,
        name_dropout: float = 0.0,
    ) -> None:
        self.rows = rows
        self.seed = seed
        self.renamer = renamer
        self.name_dropout = name_dropout
        self.root = root
        self.table = table
        self.image_key = image_key
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.latent_store = latent_store
        self.cache = cache

    def __len__(self) -> int:
        return len(self.rows)

    def image_bytes(self, row: Row) -> bytes:
        if self.table is not None:
            data = table_image_bytes(self.table[row.image][self.image_key])
            if data is None:
                raise BadImage(f"no image in column {self.image_key!r}")
            return data
        path = self.root / row.image
        if not path.is_file():
            raise BadImage(f"file not found: {path}")
        return path.read_bytes()

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        events: list[dict] = []
        # A row that fails only when decoded (a truncated JPEG) is replaced by the next one, and reported.
        for offset in range(len(self.rows)):
            row = self.rows[(index + offset) % len(self.rows)]
            rng = random if epoch is None else random.Random(f"{self.seed}:{epoch}:{row.id}")
            try:
                example = self.example(row, events, rng, self.simple_prompt(row, epoch))
            except BadImage as error:
                events.append({"kind": "skipped", "row": row.where, "id": row.id, "reason": str(error)})
                continue
            example["data_events"] = events
            return example
        raise RuntimeError(f"none of the {len(self.rows)} rows has a loadable image: {events[:3]}")

    def simple_prompt(self, row: Row, epoch: int | None) -> str:
        """The row's simple prompt; with name dropout, renamed with probability p (keyed by seed, epoch, row id)."""
        if self.renamer is None or not self.name_dropout:
            return row.simple
        return self.renamer.draw(row.simple, self.name_dropout, f"{self.seed}:{epoch}:{row.id}")

    def example(self, row: Row, events: list[dict], rng=random, simple: str | None = None) -> dict:
        data = self.image_bytes(row)
        flip = self.random_flip and rng.random() < 0.5
        example = {
            "simple_prompt": row.simple if simple is None else simple,
            "complex_prompt": row.complex,
            "id": row.id,
        }
        if row.rewrite is not None:
            example["rewrite_prompt"] = row.rewrite
        if self.latent_store is not None:
            variant = image_variants(True)[int(flip)]
            key = self.latent_store.key(content_hash(data), variant)
            entry = self.latent_store.get(key)
            if entry is not None:
                example["latent_mean"], example["latent_logvar"] = entry["mean"], entry["logvar"]
                # Stores made for SDXL keep each image's size and crop (feature_store.py).
                example.update({k: entry[k] for k in GEOMETRY if k in entry})
                return example
            if key in self.latent_store.bad:
                raise BadImage(self.latent_store.bad[key])
            if self.cache == "require":
                raise CacheMissError(
                    f"data.cache=require: no cached latent for {row.where} ({row.id}, {variant}), "
                    f"key {key} in {self.latent_store.folder}; run `python -m sur_lightning.cache` with this config"
                )
        image, repairs = load_rgb(data, self.max_image_pixels, self.min_image_side)
        events.extend({"kind": "repaired", "row": row.where, "id": row.id, "reason": r} for r in repairs)
        example["pixel_values"], geometry = preprocess_with_geometry(
            image, self.resolution, self.center_crop, flip, rng
        )
        return {**example, **geometry}


class StreamingImageTextDataset(IterableDataset):
    """WebDataset shards, streamed: rows are checked as they arrive, split across nodes and workers by shard.

    ``exclude`` holds the keys of the validation rows (the first ``val_size`` samples), so they are
    never trained on.
    """

    def __init__(
        self,
        urls,
        image_key: str | None,
        simple_key: str | None,
        complex_key: str,
        limit: PromptLimit,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        simple_prompt: Callable | None = None,
        shuffle_buffer: int = 0,
        exclude: frozenset = frozenset(),
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        min_image_side: int = 8,
        max_samples: int | None = None,
    ) -> None:
        self.urls = urls
        self.image_key = image_key
        self.simple_key = simple_key
        self.complex_key = complex_key
        self.limit = limit
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.simple_prompt = simple_prompt
        self.shuffle_buffer = shuffle_buffer
        self.exclude = exclude
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.max_samples = max_samples

    def raw_samples(self):
        import webdataset as wds

        pipeline = wds.WebDataset(
            self.urls,
            shardshuffle=bool(self.shuffle_buffer),
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        if self.shuffle_buffer:
            pipeline = pipeline.shuffle(self.shuffle_buffer)
        return pipeline

    def __iter__(self):
        pending: list[dict] = []
        held = None
        yielded = 0
        for sample in self.raw_samples():
            if self.max_samples is not None and yielded >= self.max_samples:
                break
            if sample["__key__"] in self.exclude:
                continue
            example = self.example(sample, pending)
            if example is None:
                continue
            # Hold one example back so events of bad rows at the end of the stream still reach the report.
            if held is not None:
                yield held
                yielded += 1
            example["data_events"], pending = pending, []
            held = example
        if held is not None:
            held["data_events"] = held["data_events"] + pending
            yield held

    def example(self, sample: dict, events: list[dict]) -> dict | None:
        report = DataReport()
        row, data = webdataset_row(sample, self.image_key, self.simple_key, self.complex_key)
        try:
            if "__error__" in row.extra:
                raise BadImage(row.extra["__error__"])
            if data is None:
                raise BadImage("sample has no image")
            image, repairs = load_rgb(data, self.max_image_pixels, self.min_image_side)
            for reason in repairs:
                report.repair(row.where, row.id, reason)
            if row.simple is None and self.simple_prompt is not None:
                row.simple = self.simple_prompt(row, data)
            ok = check_prompts(row, self.limit, report, self.simple_key, self.complex_key)
        except BadImage as error:
            report.skip(row.where, row.id, str(error))
            ok = False
        events.extend({"kind": kind, **event} for kind, items in report.events.items() for event in items)
        if not ok:
            return None
        flip = self.random_flip and random.random() < 0.5
        pixels, geometry = preprocess_with_geometry(image, self.resolution, self.center_crop, flip)
        return {
            "pixel_values": pixels,
            **geometry,
            "simple_prompt": row.simple,
            "complex_prompt": row.complex,
            "id": row.id,
        }


def collate(examples: list[dict]) -> dict:
    batch = {
        "simple_prompt": [e["simple_prompt"] for e in examples],
        "complex_prompt": [e["complex_prompt"] for e in examples],
        "id": [e["id"] for e in examples],
        "data_events": [event for e in examples for event in e.get("data_events", [])],
    }
    if "rewrite_prompt" in examples[0]:
        batch["rewrite_prompt"] = [e["rewrite_prompt"] for e in examples]
    cached = ["latent_mean" in e for e in examples]
    if "codes" in examples[0]:
        # Rows of a code database (code_lmdb.CodeDataset): the prior reads codes, not pixels.
        batch["codes"] = torch.stack([e["codes"] for e in examples])
    elif all(cached):
        batch["latent_mean"] = torch.stack([e["latent_mean"] for e in examples])
        batch["latent_logvar"] = torch.stack([e["latent_logvar"] for e in examples])
    elif any(cached):
        raise RuntimeError("a batch mixes cached latents and images: the feature cache changed while training")
    else:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples]).contiguous()
    for key in GEOMETRY:
        if all(key in e for e in examples):
            batch[key] = torch.stack([e[key] for e in examples])
    return batch
