"""Image + (simple prompt, complex prompt) data in the SURD layout.

A folder of images with ``metadata.jsonl`` rows ``{"file_name", "text", "prompt"}``: ``text`` is the
simple prompt, ``prompt`` the complex one. Batches are dicts::

    pixel_values   [B, 3, R, R] float in [-1, 1]
    simple_prompt  list[str]  (B)
    complex_prompt list[str]  (B)
    id             list[str]  (B)   the row's file name
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


def read_metadata_jsonl(path: Path, simple_key: str = "text", complex_key: str = "prompt") -> list[dict]:
    """Rows of a SURD ``metadata.jsonl``; a malformed line is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({error.msg})") from error
            missing = [k for k in ("file_name", simple_key, complex_key) if k not in row]
            if missing:
                raise ValueError(f"{path}:{line_number}: row lacks {missing}")
            rows.append({"id": row["file_name"], "file_name": row["file_name"], "simple": row[simple_key], "complex": row[complex_key]})
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def image_transform(resolution: int, center_crop: bool, random_flip: bool) -> transforms.Compose:
    """diffusers' text-to-image preprocessing: resize the short side, crop, flip, scale to [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


class ImageTextDataset(Dataset):
    def __init__(self, root: Path, rows: list[dict], transform) -> None:
        self.root = root
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        with Image.open(self.root / row["file_name"]) as image:
            pixels = self.transform(image.convert("RGB"))
        return {"pixel_values": pixels, "simple_prompt": row["simple"], "complex_prompt": row["complex"], "id": row["id"]}


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "simple_prompt": [e["simple_prompt"] for e in examples],
        "complex_prompt": [e["complex_prompt"] for e in examples],
        "id": [e["id"] for e in examples],
    }


class ImageTextDataModule(L.LightningDataModule):
    """Train/validation split of one image folder; ``val_size`` rows are held out (deterministic by seed)."""

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        batch_size: int = 1,
        val_size: int = 8,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        simple_key: str = "text",
        complex_key: str = "prompt",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.simple_key = simple_key
        self.complex_key = complex_key
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        metadata = self.root / "metadata.jsonl"
        if not metadata.exists():
            raise FileNotFoundError(f"data.root={self.root} has no metadata.jsonl")
        rows = read_metadata_jsonl(metadata, self.simple_key, self.complex_key)
        random.Random(self.seed).shuffle(rows)
        if self.val_size >= len(rows):
            raise ValueError(f"data.val_size={self.val_size} leaves no training rows out of {len(rows)}")
        train_transform = image_transform(self.resolution, self.center_crop, self.random_flip)
        val_transform = image_transform(self.resolution, center_crop=True, random_flip=False)
        self.val_set = ImageTextDataset(self.root, rows[: self.val_size], val_transform)
        self.train_set = ImageTextDataset(self.root, rows[self.val_size :], train_transform)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=collate
        )
