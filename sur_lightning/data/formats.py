"""Readers for the on-disk formats of (image, simple prompt, complex prompt) data.

    folder      a folder of images with ``metadata.jsonl`` or ``metadata.csv`` (SURD's layout:
                ``file_name``, ``text`` = simple prompt, ``prompt`` = complex prompt)
    parquet     ``.parquet`` file(s) with an image column (bytes, or ``{"bytes", "path"}`` as ``datasets`` writes)
    arrow       an ``.arrow`` file or a ``datasets.save_to_disk`` folder
    hub         a Hugging Face dataset id, e.g. ``diffusers/pokemon-llava-captions``
    webdataset  ``.tar`` shards (a file, a folder of them, or a brace pattern ``shard-{000000..000099}.tar``),
                each sample an image (``.png``/``.jpg``/...) plus a ``.json`` with the prompts; streamed

Map-style readers return ``Row``s and record what they could not read (a malformed or non-UTF-8
metadata line) in the ``DataReport``; prompt and image checks come later, alike for every format.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from sur_lightning.data.report import DataReport

FORMATS = ("folder", "parquet", "arrow", "hub", "webdataset")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class Row:
    """One example before its image is read.

    where:   how the data report names the row (``metadata.jsonl:12``)
    id:      stable identifier, carried into batches (``file_name``, else the table row number)
    image:   a file path (folders) or a row index into the table (parquet, arrow, hub)
    simple, complex: the prompts; None when the row lacks one
    extra:   the row's other columns (for a configurable simple-prompt source)
    rewrite: the LLM's detailed rewrite of ``simple`` (``sur_lightning.rewrite``), when the loss aligns to it
    """

    where: str
    id: str
    image: str | int
    simple: str | None
    complex: str | None
    extra: dict
    rewrite: str | None = None


def has_metadata(folder: Path) -> bool:
    return (folder / "metadata.jsonl").exists() or (folder / "metadata.csv").exists()


def folder_root(root: str | Path, split: str = "train") -> Path:
    """The folder whose metadata to read: ``root`` itself, or, as Hugging Face ``imagefolder`` does for a
    dataset root, its ``split`` folder (``SURD/`` -> ``SURD/train/``)."""
    path = Path(root)
    if has_metadata(path):
        return path
    if has_metadata(path / split):
        return path / split
    raise FileNotFoundError(f"data.root={root} has no metadata.jsonl or metadata.csv, and neither has {path / split}")


def detect_format(root: str, split: str = "train") -> str:
    path = Path(root)
    if "{" in root or path.suffix == ".tar":
        return "webdataset"
    if path.is_dir():
        if has_metadata(path) or has_metadata(path / split):
            return "folder"
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or any(path.glob("*.arrow")):
            return "arrow"
        if any(path.rglob("*.parquet")):
            return "parquet"
        if any(path.glob("*.tar")):
            return "webdataset"
        raise ValueError(f"data.root={root}: no metadata.jsonl/metadata.csv, parquet, arrow or .tar files in it")
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".arrow":
        return "arrow"
    if not path.exists() and root.count("/") == 1 and not root.startswith((".", "/")):
        return "hub"
    raise FileNotFoundError(f"data.root={root} does not exist (and is not a hub dataset id like owner/name)")


def decode_lines(data: bytes, name: str, report: DataReport):
    """Yield ``(where, text)`` for each non-empty line; a line that is not UTF-8 is reported and skipped."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{name}:{number}"
        try:
            yield where, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            report.skip(where, "?", f"line is not UTF-8 ({error.reason} at byte {error.start})")


def as_prompt(value) -> str | None:
    return None if value is None else str(value)


def read_folder(
    root: str | Path, image_key: str, simple_key: str | None, complex_key: str, report: DataReport
) -> list[Row]:
    """Rows of ``metadata.jsonl`` (preferred) or ``metadata.csv`` in ``root``; images are paths under ``root``
    (a ``file_name`` without extension is resolved by ``resolve_extension``)."""
    root = Path(root)
    rows: list[Row] = []
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.exists():
        for where, line in decode_lines(jsonl.read_bytes(), jsonl.name, report):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                report.skip(where, "?", f"malformed JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(record, dict):
                report.skip(where, "?", f"a JSON {type(record).__name__}, not an object")
                continue
            rows.append(folder_row(where, record, image_key, simple_key, complex_key))
    elif table.exists():
        lines = list(decode_lines(table.read_bytes(), table.name, report))
        if lines:
            header_where, header = lines[0]
            fields = next(csv.reader([header]))
            for where, line in lines[1:]:
                values = next(csv.reader(io.StringIO(line)), [])
                if len(values) != len(fields):
                    report.skip(
                        where, "?", f"CSV row has {len(values)} fields, the header {header_where} has {len(fields)}"
                    )
                    continue
                rows.append(folder_row(where, dict(zip(fields, values)), image_key, simple_key, complex_key))
    else:
        raise FileNotFoundError(f"data.root={root} has no metadata.jsonl or metadata.csv")
    for row in rows:
        resolve_extension(root, row, report)
    return rows


def resolve_extension(root: Path, row: Row, report: DataReport) -> None:
    """A ``file_name`` without an image extension ("00011", as in the SUR authors' sample rows) that names
    no file is pointed at the image beside it ("00011.png"), and the row is listed as repaired."""
    name = Path(row.image)
    if not row.image or name.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS or (root / name).exists():
        return
    for extension in IMAGE_EXTENSIONS:
        for candidate in (f"{name.name}.{extension}", f"{name.name}.{extension.upper()}"):
            if (root / name.parent / candidate).is_file():
                row.image = str(name.parent / candidate)
                report.repair(row.where, row.id, f"file_name {str(name)!r} has no extension: using {row.image}")
                return


def folder_row(where: str, record: dict, image_key: str, simple_key: str | None, complex_key: str) -> Row:
    file_name = record.get(image_key)
    return Row(
        where=where,
        id=str(file_name) if file_name is not None else "?",
        image=str(file_name) if file_name is not None else "",
        simple=as_prompt(record.get(simple_key)) if simple_key else None,
        complex=as_prompt(record.get(complex_key)),
        extra=record,
    )


def load_table(root: str, format: str, split: str = "train", revision: str | None = None):
    """A ``datasets.Dataset`` for parquet, arrow or hub data."""
    import datasets

    path = Path(root)
    if format == "hub":
        return datasets.load_dataset(root, split=split, revision=revision)
    if format == "arrow":
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.Dataset.from_file(str(path))
    files = sorted(str(p) for p in path.rglob("*.parquet")) if path.is_dir() else [str(path)]
    return datasets.load_dataset("parquet", data_files=files, split="train")


def table_image_bytes(value) -> bytes | None:
    """The bytes of an image cell: raw bytes, or ``{"bytes", "path"}`` as ``datasets.Image(decode=False)`` gives."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).exists():
            return Path(value["path"]).read_bytes()
    return None


def read_table(table, name: str, image_key: str, simple_key: str | None, complex_key: str) -> tuple[list[Row], object]:
    """Rows of a ``datasets.Dataset``; its image column is switched to undecoded bytes (we decode and repair)."""
    import datasets

    missing = [key for key in (image_key, simple_key, complex_key) if key and key not in table.column_names]
    if missing:
        raise ValueError(
            f"{name} has columns {table.column_names}, not {missing} (set data.image_key/simple_key/complex_key)"
        )
    if isinstance(table.features[image_key], datasets.Image):
        table = table.cast_column(image_key, datasets.Image(decode=False))
    ids = table["file_name"] if "file_name" in table.column_names and image_key != "file_name" else None
    text_columns = [c for c in table.column_names if c != image_key]
    columns = {c: table[c] for c in text_columns}
    rows = []
    for index in range(len(table)):
        record = {c: columns[c][index] for c in text_columns}
        rows.append(
            Row(
                where=f"{name} row {index}",
                id=str(ids[index]) if ids is not None else f"{index:06d}",
                image=index,
                simple=as_prompt(record.get(simple_key)) if simple_key else None,
                complex=as_prompt(record.get(complex_key)),
                extra=record,
            )
        )
    return rows, table


def webdataset_urls(root: str) -> list[str] | str:
    """Shard URLs: a brace pattern as given, a folder's ``*.tar`` files, or one ``.tar``."""
    path = Path(root)
    if "{" in root:
        return root
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"data.root={root} holds no .tar shards")
        return shards
    return [root]


def webdataset_row(
    sample: dict, image_key: str | None, simple_key: str | None, complex_key: str
) -> tuple[Row, bytes | None]:
    """A raw WebDataset sample (extension -> bytes) as a Row plus its image bytes."""
    where = f"{Path(sample.get('__url__', '?')).name}/{sample['__key__']}"
    extensions = [image_key] if image_key else IMAGE_EXTENSIONS
    image = next((sample[ext] for ext in extensions if ext in sample), None)
    record: dict = {}
    if "json" in sample:
        try:
            record = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            record = {"__error__": f"unreadable .json ({error})"}
    elif "txt" in sample:
        record = {complex_key: sample["txt"].decode("utf-8", errors="replace")}
    row = Row(
        where=where,
        id=str(record.get("file_name") or sample["__key__"]),
        image=sample["__key__"],
        simple=as_prompt(record.get(simple_key)) if simple_key else None,
        complex=as_prompt(record.get(complex_key)),
        extra=record,
    )
    return row, image
