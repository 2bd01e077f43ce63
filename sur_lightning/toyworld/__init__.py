"""The toy world: generated shapes whose content is known exactly, a lexicon of narrative object words,
deterministic splits (``world``), and a small text-to-image base model this project trains on it
(``pretrain``) and ships in ``base/``, in Stable Diffusion's folder layout (``backbone=toy``).

Beside the base ships its image tower (``base/image_tower/``, ``models/image_tower.py``): a contrastive image–text
space for unCLIP and an offline CLIP score, trained by ``python -m sur_lightning.toyworld.image_tower``.

``pretrain``, ``image_tower`` and ``probe`` are entry points (``python -m sur_lightning.toyworld.pretrain`` /
``.image_tower`` / ``.probe``); the rest is library. May import: ``data`` (the shapes and their palette); the entry points also ``models``, ``knowledge``,
``evaluation`` and ``config``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_hashes(folder: Path, record_file: Path, what: str, command: str) -> dict:
    """Check every file that ``record_file``'s ``sha256`` names (relative to ``folder``) against its recorded
    SHA-256; returns the record. A missing record, or a missing or changed file, is an error naming it;
    ``command`` is how to make one."""
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file} not found: {folder} is not a {what} (make one with `{command}`)")
    record = json.loads(record_file.read_text())
    for name, expected in record["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} is missing (recorded in {record_file})")
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(
                f"{what}: {path} has SHA-256 {actual}, but {record_file} records {expected}; "
                "the file is damaged or was replaced (git checkout it, or retrain with the recorded command)"
            )
    return record


def verify_base(folder: str | Path = BASE_DIR) -> dict:
    """Check every weight file of a base folder against the SHA-256 its ``base.json`` records; returns
    that record. A missing or changed file is an error naming it."""
    folder = Path(folder)
    return verify_hashes(folder, folder / "base.json", "toy-world base", "python -m sur_lightning.toyworld.pretrain")


def shipped_base(folder: str | Path | None = None, verify: bool = True) -> str:
    """The folder of the toy-world base model (SD layout), checked against its recorded hashes.
    ``folder``: a base made by ``sur_lightning.toyworld.pretrain``; None is the shipped one."""
    folder = BASE_DIR if folder is None else Path(folder)
    if verify:
        verify_base(folder)
    return str(folder)


IMAGE_TOWER_DIR = BASE_DIR / "image_tower"
IMAGE_TOWER_RECORD = "image_tower.json"


def verify_image_tower(folder: str | Path = IMAGE_TOWER_DIR) -> dict:
    """Check an image tower's weights against the SHA-256 its ``image_tower.json`` records; returns that record.
    A missing or changed file is an error naming it."""
    folder = Path(folder)
    return verify_hashes(
        folder, folder / IMAGE_TOWER_RECORD, "toy-world image tower", "python -m sur_lightning.toyworld.image_tower"
    )


def shipped_image_tower(folder: str | Path | None = None, verify: bool = True) -> str:
    """The folder of the toy world's image tower (``models.image_tower.ImageTower``), checked against its recorded
    hash. ``folder``: a tower made by ``sur_lightning.toyworld.image_tower``; None is the shipped one."""
    folder = IMAGE_TOWER_DIR if folder is None else Path(folder)
    if verify:
        verify_image_tower(folder)
    return str(folder)
