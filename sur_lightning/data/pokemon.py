"""pokemon-llava-captions (hub ``diffusers/pokemon-llava-captions``: columns ``image``, ``text``; 833 rows, one
parquet file): the 833 images of ``lambdalabs/pokemon-blip-captions`` with LLaVA's long captions.

The LLaVA caption is the complex prompt. The simple prompt comes from one of (``data.simple_prompt``):

    data.simple_key=<column>                         a column of the table itself
    sur_lightning.data.pokemon.PairedCaptions        a pairing file keyed by image hash, e.g. the BLIP
                                                     captions of the same images
    sur_lightning.data.pokemon.FirstClause           the caption's first clause

Each is a callable ``(row, image_bytes) -> str | None``; None skips the row (reported).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from sur_lightning.data.formats import Row, detect_format, load_table, table_image_bytes

# LLaVA captions open with a framing phrase; the first clause after it names the subject.
FRAMING = re.compile(
    r"^\s*(the|this)\s+(image|picture|illustration|drawing|artwork)\s+(shows|features|depicts|is of|displays)\s+",
    re.IGNORECASE,
)
CLAUSE_END = re.compile(r"[.,;:!?]|\s(?:with|which|who|that|and|while|in which)\s", re.IGNORECASE)


def first_clause(caption: str) -> str:
    """'The image features a cartoon pink bird with big eyes, standing ...' -> 'a cartoon pink bird'."""
    text = FRAMING.sub("", caption.strip())
    match = CLAUSE_END.search(text)
    clause = text[: match.start()] if match else text
    return clause.strip()


class FirstClause:
    """Simple prompt = the first clause of the complex prompt (LLaVA's framing phrase removed)."""

    def __call__(self, row: Row, image: bytes) -> str | None:
        return first_clause(row.complex) if row.complex else None


def pixel_hash(data: bytes) -> str:
    """sha256 of the decoded RGB pixels and size: equal for the same picture re-encoded (PNG vs parquet bytes)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    return hashlib.sha256(str(rgb.shape).encode() + rgb.tobytes()).hexdigest()


class PairedCaptions:
    """Simple prompt = the caption of the same image in another dataset, matched by pixel hash.

    source: a ``.jsonl`` of ``{"image_sha256": ..., "text": ...}`` (as ``write_pairing`` writes), or any
    dataset ``ImageTextDataModule`` reads (folder, parquet, arrow, hub id) with ``image_key``/``text_key``,
    e.g. ``lambdalabs/pokemon-blip-captions`` (a mirror: ``svjack/pokemon-blip-captions-en-zh``).
    """

    def __init__(self, source: str, image_key: str = "image", text_key: str = "text") -> None:
        self.source = str(source)
        if self.source.endswith(".jsonl"):
            lines = Path(self.source).read_text(encoding="utf-8").splitlines()
            self.captions = {r["image_sha256"]: r["text"] for r in map(json.loads, filter(str.strip, lines))}
        else:
            self.captions = read_pairing(self.source, image_key, text_key)

    def __call__(self, row: Row, image: bytes) -> str | None:
        return self.captions.get(pixel_hash(image))


def read_pairing(source: str, image_key: str = "image", text_key: str = "text") -> dict[str, str]:
    """{pixel hash: caption} of a table or image folder."""
    import datasets

    fmt = detect_format(source)
    if fmt == "folder":
        from sur_lightning.data.formats import read_folder
        from sur_lightning.data.report import DataReport

        rows = read_folder(source, image_key, None, text_key, DataReport())
        return {pixel_hash((Path(source) / r.image).read_bytes()): r.complex for r in rows if r.complex}
    table = load_table(source, fmt)
    if isinstance(table.features[image_key], datasets.Image):
        table = table.cast_column(image_key, datasets.Image(decode=False))
    images, texts = table[image_key], table[text_key]
    return {pixel_hash(table_image_bytes(i)): t for i, t in zip(images, texts) if table_image_bytes(i) and t}


def write_pairing(source: str, out: str, image_key: str = "image", text_key: str = "text") -> Path:
    """Write ``{"image_sha256", "text"}`` lines for ``PairedCaptions``, so the pairing dataset is read once."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pairs = read_pairing(source, image_key, text_key)
    out_path.write_text("".join(json.dumps({"image_sha256": h, "text": t}) + "\n" for h, t in pairs.items()))
    return out_path
