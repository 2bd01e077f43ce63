"""Grids: images side by side with their labels (``grid.png``), and one η strip per adapter, prompt and seed."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from sur_lightning.generation.columns import Column
    from sur_lightning.generation.pipeline import Rendered


def labelled_grid(columns: dict[str, list[Image.Image]], row_labels: list[str], cell: int = 128) -> Image.Image:
    """A grid with one column per entry of ``columns`` and one row per label, titles drawn in."""
    header, label_width = 16, 160
    names = list(columns)
    grid = Image.new("RGB", (label_width + cell * len(names), header + cell * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((label_width + j * cell + 4, 2), name[:22], fill="black")
        for i, image in enumerate(columns[name]):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + j * cell, header + i * cell))
    for i, label in enumerate(row_labels):
        lines = textwrap.wrap(label, 24)[:5]  # whole prompts, wrapped: the row's prompt must be readable
        top = header + i * cell + cell // 2 - 6 * len(lines)
        for k, line in enumerate(lines):
            draw.text((4, top + 12 * k), line, fill="black")
    return grid


def save_grid(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_grids(rendered: Sequence[Rendered], columns: Sequence[Column], out_dir: str | Path, strips: bool) -> dict:
    """``grid.png`` (columns × (prompt, seed) rows) and, when ``strips``, one strip per adapter, prompt and
    seed (base plus every η of that adapter) under ``strips/<adapter>/``. Returns the written paths."""
    out_dir = Path(out_dir)
    by_key = {(r.column, r.prompt.id, r.seed): r.image for r in rendered}
    rows = list(dict.fromkeys((r.prompt.id, r.prompt.prompt, r.seed) for r in rendered))
    several_seeds = len({seed for _, _, seed in rows}) > 1
    labels = [f"{text} ({seed})" if several_seeds else text for _, text, seed in rows]
    grid = {c.name: [by_key[(c.name, pid, seed)] for pid, _, seed in rows] for c in columns}
    written = {"grid": str(save_grid(labelled_grid(grid, labels), out_dir / "grid.png"))}
    if strips:
        adapters: dict[str, list[Column]] = {}
        for column in columns:
            if "adapter" in column.source:
                adapters.setdefault(column.name.rsplit(" eta=", 1)[0], []).append(column)
        base = [c for c in columns if c.name == "base"]
        written["strips"] = []
        for adapter, adapter_columns in adapters.items():
            folder = out_dir / "strips" / re.sub(r"[^A-Za-z0-9._-]+", "_", adapter)
            for (pid, text, seed), label in zip(rows, labels):
                strip = {
                    c.name.replace(adapter + " ", ""): [by_key[(c.name, pid, seed)]] for c in base + adapter_columns
                }
                written["strips"].append(
                    str(save_grid(labelled_grid(strip, [label]), folder / f"{pid}_seed{seed}.png"))
                )
    return written
