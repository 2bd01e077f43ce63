"""``manifest.json``: what produced each image of a generate run (column source, prompt, seed), and reading it back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.generation.pipeline import Rendered

if TYPE_CHECKING:
    from sur_lightning.generation.columns import Column


def write_manifest(out_dir: Path, rendered: Sequence[Rendered], columns: Sequence[Column], config: dict) -> Path:
    sources = {c.name: c.source for c in columns}
    images = [
        {
            "file": r.file,
            "column": r.column,
            "prompt_id": r.prompt.id,
            "prompt": r.prompt.prompt,
            "category": r.prompt.category,
            "complex": r.prompt.complex,
            "target": r.prompt.target,
            "seed": r.seed,
            **sources.get(r.column, {}),
            **r.info,
        }
        for r in rendered
    ]
    settings = {k: config.get(k) for k in ("backbone", "llm", "sampler", "negative_prompt", "mode", "device", "tool")}
    path = out_dir / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "columns": sources, "images": images}, indent=2, default=str))
    return path


def read_manifest(folder: str | Path) -> list[Rendered]:
    """The images a ``generate`` run wrote, with their prompts and seeds, from its ``manifest.json``."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: images_dir must be the output folder of a generate run")
    rows = json.loads(manifest.read_text())["images"]
    return [
        Rendered(
            row["column"],
            Prompt(
                row["prompt_id"],
                row["prompt"],
                row["category"],
                row.get("complex"),
                tuple(row["target"]) if row.get("target") else None,
            ),
            int(row["seed"]),
            Image.open(folder / row["file"]).convert("RGB"),
            row["file"],
        )
        for row in rows
    ]
