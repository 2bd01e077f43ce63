"""Discrete image codes in one LMDB database: written once by a tokenizer, read lock-free by the prior's training.

The second stage of the VQ + PixelSNAIL pipeline. ``extract_codes`` reads an image-text dataset (a folder with
``metadata.jsonl``/``.csv``, parquet, arrow or a hub dataset: the map-style formats of ``formats.py``), encodes
every usable image with a tokenizer and writes, per row, keyed by the row's id (its ``file_name``):

    database ``codes``  id -> the codes [G, G] as little-endian uint16 bytes (raster order)
    database ``rows``   id -> JSON ``{"id", "where", "simple_prompt", "complex_prompt"}``
    database ``meta``   ``info`` -> JSON ``{"grid": [G, G], "codebook_size", "tokenizer", "resolution", "source"}``

Writing goes in batches, one LMDB write transaction per batch holding both the codes and the rows, so a
killed run leaves whole batches only. Running it again resumes: rows whose id is already in the database are
not read again, the others are written, and no row is ever there twice (LMDB keys are unique). A database
written by another tokenizer (its ``fingerprint()``), at another resolution or from another source is refused.

Rows that cannot be used are skipped and named in ``data_report.json`` beside the database (``report.py``):
an image that is missing or does not decode, a missing or empty prompt, a duplicate id.

``CodeDataset`` reads the database read-only and without a lock file (``lock=False``: many readers, no
writer) and yields ``{"codes" [G, G] int64, "simple_prompt", "complex_prompt", "id"}``, stacked by
``datasets.collate`` into ``codes`` [B, G, G].
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sur_lightning.data.datasets import ImageTextDataset, PromptLimit, check_prompts, preprocess
from sur_lightning.data.formats import Row, detect_format, folder_root, load_table, read_folder, read_table
from sur_lightning.data.images import BadImage, load_rgb
from sur_lightning.data.report import DataReport

DATABASES = (b"codes", b"rows", b"meta")
INFO_KEY = b"info"
# The largest the database may grow; LMDB maps it sparsely, so the file takes only what is written.
MAP_SIZE = 1 << 36


@dataclass
class Extraction:
    """What one ``extract_codes`` call did: rows it wrote, rows found already written, and the data report."""

    written: int
    present: int
    report: DataReport


def read_rows(root: str, image_key: str, simple_key: str, complex_key: str, report: DataReport):
    """(rows, folder or None, table or None) of a map-style dataset, as the DataModule reads them."""
    format = detect_format(str(root))
    if format == "webdataset":
        raise ValueError(f"extract_codes: {root} holds WebDataset shards; extract from a folder, parquet or arrow copy")
    if format == "folder":
        folder = folder_root(root)
        report.folder = str(folder)
        return read_folder(folder, image_key, simple_key, complex_key, report), folder, None
    table = load_table(str(root), format)
    rows, table = read_table(table, Path(root).name, image_key, simple_key, complex_key)
    return rows, None, table


def open_database(path: str | Path, readonly: bool):
    """The LMDB environment at ``path`` (a folder) and its three named databases."""
    import lmdb

    if readonly:
        if not (Path(path) / "data.mdb").is_file():
            raise FileNotFoundError(f"{path} is not a code database (no data.mdb): run extract_codes first")
        # lock=False: readers of a finished database need no lock file (and may sit on a read-only disk).
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_dbs=len(DATABASES))
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(DATABASES))
    return env, {name.decode(): env.open_db(name, create=not readonly) for name in DATABASES}


# Read-only environments of this process, by (database folder, pid). LMDB refuses to open one environment twice in
# a process (train and validation datasets share one), and an environment must not cross a fork into dataloader
# workers: each worker's pid opens its own.
READERS: dict[tuple[str, int], tuple] = {}


def reader(path: str | Path) -> tuple:
    """(environment, databases) of this process's read-only view of the database at ``path``."""
    key = (str(Path(path).resolve()), os.getpid())
    if key not in READERS:
        READERS[key] = open_database(path, readonly=True)
    return READERS[key]


def close_reader(path: str | Path) -> None:
    """Close this process's read-only view of ``path`` (before writing to it); readers reopen on their next row."""
    env_db = READERS.pop((str(Path(path).resolve()), os.getpid()), None)
    if env_db is not None:
        env_db[0].close()


def check_info(path: Path, found: dict, expected: dict) -> None:
    """Refuse to resume into a database written with other settings; the error names the database and each difference."""
    differences = [
        f"{key}: database {found.get(key)!r}, now {value!r}"
        for key, value in expected.items()
        if found.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"code database {path} was written with other settings ({'; '.join(differences)}): "
            "extract into a new folder, or delete this one"
        )


def extract_codes(
    root: str,
    out: str | Path,
    tokenizer,
    resolution: int,
    batch_size: int = 64,
    image_key: str = "file_name",
    simple_key: str = "text",
    complex_key: str = "prompt",
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Extraction:
    """Encode every usable row of the dataset at ``root`` into the code database at ``out`` (resumable; see the
    module docstring).

    tokenizer:  has ``encode(images [B, 3, R, R] in [-1, 1]) -> codes [B, G, G] int``, ``fingerprint() -> str``
                and ``codebook_size`` (``sur_lightning.models.vq_tokenizer.LatentVQTokenizer``).
    resolution: R, the side images are resized and centre-cropped to.
    on_batch:   called with the number of rows written so far after each committed batch.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    report = DataReport()
    rows, folder, table = read_rows(root, image_key, simple_key, complex_key, report)
    report.rows = len(rows) + len(report.skipped_rows())
    loader = ImageTextDataset(rows, folder, table, image_key, resolution, center_crop=True, random_flip=False)
    limit = PromptLimit(None)  # the prior reads the prompts through its own text encoder; nothing to cut here
    good, seen = [], {}
    for row in rows:
        if row.id in seen:
            report.skip(row.where, row.id, f"duplicate {image_key} {row.id!r}, first at {seen[row.id]}")
            continue
        seen[row.id] = row.where
        if check_prompts(row, limit, report, simple_key, complex_key):
            good.append(row)

    close_reader(out)
    env, db = open_database(out, readonly=False)
    written = present = 0
    try:
        with env.begin() as txn:
            info = txn.get(INFO_KEY, db=db["meta"])
            todo = [row for row in good if txn.get(row.id.encode(), db=db["rows"]) is None]
        present = len(good) - len(todo)
        # A local source by its absolute path, so a resume from another working directory is the same source.
        source = str(Path(root).resolve()) if Path(root).exists() else str(root)
        expected = {
            "tokenizer": tokenizer.fingerprint(),
            "resolution": resolution,
            "source": source,
            "codebook_size": int(tokenizer.codebook_size),
        }
        first = info is None
        if not first:
            check_info(out, json.loads(info), expected)
        with tqdm(
            total=len(good), initial=present, desc=f"codes -> {out.name}", unit="img", disable=not progress
        ) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                images, kept = [], []
                for row in batch:
                    try:
                        image, repairs = load_rgb(loader.image_bytes(row))
                    except BadImage as error:
                        report.skip(row.where, row.id, str(error))
                        continue
                    for reason in repairs:
                        report.repair(row.where, row.id, reason)
                    images.append(preprocess(image, resolution, True, False))
                    kept.append(row)
                bar.update(len(batch) - len(kept))
                if not kept:
                    continue
                codes = tokenizer.encode(torch.stack(images)).cpu()
                write_batch(env, db, kept, codes, {**expected, "grid": list(codes.shape[1:])} if first else None)
                first = False
                written += len(kept)
                bar.update(len(kept))
                if on_batch is not None:
                    on_batch(written)
    finally:
        env.close()
        report.write(out / "data_report.json")
    return Extraction(written, present, report)


def write_batch(env, db: dict, rows: list[Row], codes: torch.Tensor, info: dict | None) -> None:
    """One transaction: each row's codes [G, G] and prompts (and the database's info with its first batch)."""
    if int(codes.max()) >= 1 << 16 or int(codes.min()) < 0:
        raise ValueError(f"codes in [{int(codes.min())}, {int(codes.max())}] do not fit the database's uint16")
    with env.begin(write=True) as txn:
        if info is not None:
            txn.put(INFO_KEY, json.dumps(info).encode(), db=db["meta"])
        for row, grid in zip(rows, codes):
            key = row.id.encode()
            txn.put(key, grid.numpy().astype("<u2").tobytes(), db=db["codes"])
            record = {"id": row.id, "where": row.where, "simple_prompt": row.simple, "complex_prompt": row.complex}
            txn.put(key, json.dumps(record, ensure_ascii=False).encode(), db=db["rows"])


class CodeDataset(Dataset):
    """The rows of a code database (``extract_codes``), in key order, read lock-free.

    ``keys``: a subset of row ids (a train/validation split); None reads every row. An index may be an int or the
    ``(epoch, index)`` pair ``sampler.EpochSampler`` yields. The LMDB environment is this process's shared
    read-only one (``reader``), opened on first use, so a dataset pickles into dataloader workers as a path.
    """

    def __init__(self, path: str | Path, keys: list[str] | None = None) -> None:
        self.path = Path(path)
        env, db = reader(self.path)
        with env.begin() as txn:
            info = txn.get(INFO_KEY, db=db["meta"])
            if info is None:
                raise ValueError(f"code database {self.path} has no info record: its extraction never wrote a batch")
            self.info = json.loads(info)
            stored = [key.decode() for key in txn.cursor(db=db["rows"]).iternext(keys=True, values=False)]
        if keys is not None:
            missing = sorted(set(keys) - set(stored))
            if missing:
                raise KeyError(f"code database {self.path} has no rows {missing[:5]} ({len(missing)} missing)")
        self.keys = stored if keys is None else list(keys)
        self.grid = tuple(self.info["grid"])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):
            index = index[1]
        key = self.keys[index]
        env, db = reader(self.path)
        with env.begin() as txn:
            codes = txn.get(key.encode(), db=db["codes"])
            record = txn.get(key.encode(), db=db["rows"])
        if codes is None or record is None:
            raise KeyError(f"code database {self.path}: row {key!r} has no {'codes' if codes is None else 'record'}")
        record = json.loads(record)
        grid = torch.from_numpy(np.frombuffer(codes, dtype="<u2").astype(np.int64)).view(self.grid)
        return {
            "codes": grid,
            "simple_prompt": record["simple_prompt"],
            "complex_prompt": record["complex_prompt"],
            "id": record["id"],
        }


class CodeDataModule(L.LightningDataModule):
    """The prior's training data: an image-text dataset's codes, extracted on first use into a code database.

    ``setup`` runs ``extract_codes`` (resumable: a killed extraction continues, a finished one is only
    checked) from the dataset at ``root`` into ``out`` with the tokenizer saved at ``tokenizer``
    (``LatentVQTokenizer.save_pretrained``, e.g. the ``tokenizer/`` folder of a ``+experiment=vqvae_toy`` run),
    copies its ``data_report.json`` beside the run (``report_dir``), and serves ``CodeDataset`` rows: ``val_size``
    rows drawn by ``seed`` for validation, the rest for training in ``EpochSampler`` order (resumable mid-epoch).
    Batches: ``{"codes" [B, G, G] int64, "simple_prompt", "complex_prompt", "id"}``.

    ``out`` null: ``<root>/codes-<tokenizer fingerprint>``, so each codebook has its own database.
    """

    def __init__(
        self,
        root: str,
        tokenizer: str,
        out: str | None = None,
        resolution: int = 64,
        batch_size: int = 32,
        val_size: int = 32,
        num_workers: int = 0,
        extract_batch_size: int = 64,
        report_dir: str | None = None,
        image_key: str = "file_name",
        simple_key: str = "text",
        complex_key: str = "prompt",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = str(root)
        self.tokenizer = str(tokenizer)
        self.out = out
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.extract_batch_size = extract_batch_size
        self.report_dir = report_dir
        self.keys = (image_key, simple_key, complex_key)
        self.seed = seed
        self.train_set: CodeDataset | None = None
        self.val_set: CodeDataset | None = None
        self.train_sampler = None
        self.extraction: Extraction | None = None

    def database(self, tokenizer) -> Path:
        return Path(self.out) if self.out else Path(self.root) / f"codes-{tokenizer.fingerprint()}"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sur_lightning.models.vq_tokenizer import LatentVQTokenizer

        tokenizer = LatentVQTokenizer.from_pretrained(self.tokenizer)
        path = self.database(tokenizer)
        image_key, simple_key, complex_key = self.keys
        self.extraction = extract_codes(
            self.root, path, tokenizer, self.resolution, self.extract_batch_size, image_key, simple_key, complex_key
        )
        del tokenizer
        if self.report_dir is not None:
            self.extraction.report.write(Path(self.report_dir) / "data_report.json")
        every = CodeDataset(path)
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = sorted(every.keys[i] for i in order[: self.val_size])
        train = [key for key in every.keys if key not in set(val)]
        if not train:
            raise ValueError(
                f"code database {path}: {len(every)} rows leave none for training after val_size={self.val_size}"
            )
        self.train_set, self.val_set = CodeDataset(path, train), (CodeDataset(path, val) if val else None)

    def train_dataloader(self) -> DataLoader:
        from sur_lightning.data.datasets import collate
        from sur_lightning.data.sampler import EpochSampler, ResumableDataLoader

        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.train_sampler = EpochSampler(len(self.train_set), seed=self.seed, rank=rank, world_size=world_size)
        return ResumableDataLoader(
            self.train_set,
            sampler=self.train_sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        from sur_lightning.data.datasets import collate

        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=collate
        )

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch.pop("data_events", None)
        if self.train_sampler is not None and self.trainer is not None and self.trainer.training:
            # This batch reaches the training step now (the loader runs a batch ahead): the resumable position.
            self.train_sampler.consumed += len(batch["id"])
        return batch
