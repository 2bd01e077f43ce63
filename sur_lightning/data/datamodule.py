"""Image + (simple prompt, complex prompt) data from any of the formats in ``formats.py``, with no silent loss.

Batches are dicts::

    pixel_values   [B, 3, R, R] float in [-1, 1]     (absent when the latents come from the cache)
    latent_mean    [B, 4, R/f, R/f]                  cached VAE posterior mean  (only with data.cache)
    latent_logvar  [B, 4, R/f, R/f]                  cached VAE posterior log-variance
    original_size  [B, 2] int64  (height, width) before resizing   } SDXL's micro-conditioning; from the cache
    crop_top_left  [B, 2] int64  (top, left) of the crop           } only when it was built for SDXL
    simple_prompt  list[str]  (B)   with name dropout (training rows only), some renamed: "a pair of sukebs"
    complex_prompt list[str]  (B)
    id             list[str]  (B)   the row's file name (or table row number)

Every row is checked before training: unreadable metadata lines, missing or empty prompts, duplicate
file names, missing files, images that are not images, decompression bombs, tiny or truncated images
are skipped; CMYK/RGBA/palette/16-bit/grayscale images are converted and EXIF rotation applied;
prompts over the tokenizer's limit are cut at a word boundary. Each is counted in ``data_report.json``
(written beside the run) and in the W&B summary. A row that still fails to decode while training is
replaced by the next good row and reported the same way.

The feature cache (``sur_lightning.training.feature_cache``, ``data.cache``) meets the datamodule at six
methods and nothing else: it asks ``cache_images()`` (which image variants training and validation read),
``image_content(row)`` and ``cache_pixels(row, variant)`` (an image's content hash and its VAE input), and
``cache_prompts()`` (the prompts whose CLIP and LLM states the rows need); it hands back ``skip_rows``
(images it could not encode) and ``use_latent_store`` (where the latents are now). The datasets live in
``datasets.py``, the resumable sampler in ``sampler.py``. Just over 400 lines: one class, whose row checking,
split, streaming set-up, cache methods and loaders share its state.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sur_lightning.data.datasets import (
    ImageTextDataset,
    PromptLimit,
    StreamingImageTextDataset,
    check_prompts,
    collate,
    content_hash,
    image_variants,
    preprocess_with_geometry,
)
from sur_lightning.data.formats import (
    Row,
    detect_format,
    folder_root,
    load_table,
    read_folder,
    read_table,
    webdataset_urls,
)
from sur_lightning.data.images import MAX_IMAGE_PIXELS, BadImage, check_image, load_rgb
from sur_lightning.data.report import DataReport
from sur_lightning.data.sampler import EpochSampler, ResumableDataLoader
from sur_lightning.data.surd import PrecomputedLLMFeatures

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "require", "off")


class ImageTextDataModule(L.LightningDataModule):
    """Train/validation split of one dataset; ``val_size`` rows are held out (deterministic by ``seed``).

    root:          a folder with metadata.jsonl/.csv, parquet or arrow file(s) or folder, .tar shards
                   (or a brace pattern), or a hub dataset id; ``format`` says which when ``auto`` cannot tell.
    image_key:     the column (or metadata field) holding the image or its file name.
    simple_key, complex_key: the prompt columns; ``simple_key: null`` takes the simple prompt from
                   ``simple_prompt``, a callable ``(row, image_bytes) -> str | None`` (see ``pokemon.py``).
    simple_from:   ``llm``: the rewriter writes every row's simple prompt from its complex one (its
                   ``simplify`` template), for datasets with detailed captions only; null: ``simple_key``/``simple_prompt``.
    rewriter:      a ``sur_lightning.knowledge.rewriter.PromptRewriter``, for ``simple_from=llm`` and ``rewrite``.
    rewrite:       attach the rewriter's detailed rewrite of every simple prompt (batch key ``rewrite_prompt``),
                   the alignment target of ``loss.align_target=rewrite|both``.
    tokenizer:     a Stable Diffusion folder or hub id; prompts over its ``tokenizer/`` limit are cut and counted.
    pin_memory:    page-locked training batches (null: when CUDA is present).
    cache:         auto | require | off, with ``cache_dir``: see ``sur_lightning/training/feature_cache.py``.
    report_dir:    where ``data_report.json`` is written (the run's folder).
    balance_by:    a metadata column (the toy world's ``shape``, ``object``, ``color``): every value of it gets an
                   equal share of each training epoch, its rows drawn with replacement (``EpochSampler(weights=...)``);
                   null: every row once per epoch. The shares are written to the data report.
    name_dropout, name_variants, name_knowledge_base: name dropout for the training rows (p, K and the
                   knowledge base whose "Name (plural)" titles are the names; see ``sur_lightning.knowledge.name_dropout.NameDropout``).
                   conf/data takes all three from ``llm.rag`` (``llm.rag.name_dropout`` is the switch);
                   validation rows are never renamed. ``renamed_prompts`` lists every renamed variant, for the cache.
    """

    def __init__(
        self,
        root: str,
        format: str = "auto",
        resolution: int = 512,
        batch_size: int = 1,
        val_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        image_key: str = "file_name",
        simple_key: str | None = "text",
        complex_key: str = "prompt",
        simple_prompt: Callable | None = None,
        simple_from: str | None = None,
        rewriter=None,
        rewrite: bool = False,
        split: str = "train",
        revision: str | None = None,
        tokenizer: str | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        min_image_side: int = 8,
        shuffle_buffer: int = 1000,
        cache: str = "off",
        cache_dir: str | None = None,
        report_dir: str | None = None,
        seed: int = 0,
        name_dropout: float = 0.0,
        name_variants: int = 4,
        name_knowledge_base: str | None = None,
        balance_by: str | None = None,
    ) -> None:
        super().__init__()
        if cache not in CACHE_MODES:
            raise ValueError(f"data.cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache != "off" and not center_crop:
            raise ValueError(
                "data.cache stores one latent per crop: it needs data.center_crop=true (random_flip is fine)"
            )
        self.root = str(root)
        self.format = detect_format(self.root, split) if format == "auto" else format
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        # Page-locked batches let Lightning's non-blocking host→GPU copy overlap the step; null: when CUDA is present.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.image_key = image_key
        self.simple_key = simple_key
        self.complex_key = complex_key
        self.simple_prompt = simple_prompt
        if simple_from not in (None, "llm"):
            raise ValueError(f"data.simple_from must be null or 'llm', got {simple_from!r}")
        if (simple_from == "llm" or rewrite) and rewriter is None:
            raise ValueError(
                "data.simple_from=llm and loss.align_target=rewrite|both need a rewriter (conf/rewriter): got none"
            )
        if (simple_from == "llm" or rewrite) and self.format == "webdataset":
            raise ValueError(
                "data.format=webdataset streams its rows, but LLM-written prompts (data.simple_from=llm, "
                "loss.align_target=rewrite|both) are written for all rows up front: use a folder/parquet/arrow copy"
            )
        self.simple_from = simple_from
        self.rewriter = rewriter
        self.rewrite = rewrite
        self.split = split
        self.revision = revision
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.shuffle_buffer = shuffle_buffer
        self.cache = cache
        self.cache_dir = cache_dir
        self.report_dir = report_dir
        self.seed = seed
        if balance_by is not None and self.format == "webdataset":
            raise ValueError(
                f"data.balance_by={balance_by!r} weights rows drawn by index, but data.format=webdataset streams its "
                "rows: use a folder/parquet/arrow copy"
            )
        self.balance_by = balance_by
        self.name_dropout = float(name_dropout or 0.0)
        self.name_variants = int(name_variants)
        self.renamer = self.name_renamer(name_variants, name_knowledge_base)
        self.report = DataReport()
        self.train_set = None
        self.val_set = None
        self.latent_store = None
        self.precomputed_llm: PrecomputedLLMFeatures | None = None
        self.train_sampler: EpochSampler | None = None

    def name_renamer(self, variants: int, knowledge_base: str | None):
        """The ``NameDropout`` of the training rows; None without name dropout."""
        if not 0.0 <= self.name_dropout <= 1.0:
            raise ValueError(f"data.name_dropout is a probability in [0, 1], got {self.name_dropout}")
        if not self.name_dropout:
            return None
        if self.format == "webdataset":
            raise ValueError(
                "name dropout renames each row's K fixed variants, for map-style data: WebDataset shards are streamed"
            )
        if knowledge_base is None:
            raise ValueError(
                f"data.name_dropout={self.name_dropout} renames objects in the prompt and in its retrieved fact: it needs "
                "retrieval (+llm/rag=toyworld), whose llm.rag.knowledge_base names them (data.name_knowledge_base)"
            )
        from sur_lightning.knowledge.name_dropout import NameDropout

        return NameDropout.for_knowledge_base(knowledge_base, variants)

    def renamed_prompts(self) -> list[tuple[str, Row]]:
        """(renamed prompt, row) for every name-dropout variant of every training row's simple prompt."""
        if self.renamer is None or self.train_set is None or not hasattr(self.train_set, "rows"):
            return []
        return [(variant, row) for row in self.train_set.rows for variant in self.renamer.all_variants(row.simple)]

    # ---------------------------------------------------------------- reading and checking rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if self.format == "webdataset":
                self.setup_streaming()
            else:
                self.setup_rows()
            self.write_report()
        if self.precomputed_llm is not None:
            # Precomputed LLM features (SURD's prompt2vec): a prompt absent from the file is a skipped row.
            llm = self.precomputed_llm
            rows = self.train_set.rows + (self.val_set.rows if self.val_set else [])
            self.skip_rows({r.where: f"simple prompt not in {llm.path}" for r in llm.missing_prompts(rows)})

    def setup_rows(self) -> None:
        limit = PromptLimit(self.tokenizer)
        root, table = None, None
        if self.format == "folder":
            root = folder_root(self.root, self.split)
            self.report.folder = str(root)
            if root != Path(self.root):
                print(f"data.root={self.root}: reading the {self.split!r} split folder {root}", flush=True)
            rows = read_folder(root, self.image_key, self.simple_key, self.complex_key, self.report)
        else:
            table = load_table(self.root, self.format, self.split, self.revision)
            rows, table = read_table(table, Path(self.root).name, self.image_key, self.simple_key, self.complex_key)
        self.report.rows = len(rows) + len(self.report.skipped_rows())
        if self.simple_from == "llm":
            self.write_simple_prompts(rows)
        loader = ImageTextDataset(rows, root, table, self.image_key, self.resolution, True, False)
        good, seen = [], {}
        for row in rows:
            if row.id in seen:
                self.report.skip(row.where, row.id, f"duplicate {self.image_key} {row.id!r}, first at {seen[row.id]}")
                continue
            seen[row.id] = row.where
            try:
                data = loader.image_bytes(row)
                for reason in check_image(data, self.max_image_pixels, self.min_image_side):
                    self.report.repair(row.where, row.id, reason)
            except BadImage as error:
                self.report.skip(row.where, row.id, str(error))
                continue
            if row.simple is None and self.simple_prompt is not None:
                row.simple = self.simple_prompt(row, data)
            if check_prompts(row, limit, self.report, self.simple_key, self.complex_key):
                good.append(row)
        if not good:
            raise ValueError(f"data.root={self.root}: no usable rows out of {self.report.rows}\n{self.report}")
        if self.rewrite:
            for row, rewrite in zip(good, self.rewriter.rewrite([r.simple for r in good], task="expand")):
                row.rewrite = rewrite
        random.Random(self.seed).shuffle(good)
        if self.val_size >= len(good):
            raise ValueError(f"data.val_size={self.val_size} leaves no training rows out of {len(good)} usable")
        common = {
            "root": root,
            "table": table,
            "image_key": self.image_key,
            "resolution": self.resolution,
            "max_image_pixels": self.max_image_pixels,
            "min_image_side": self.min_image_side,
        }
        self.val_set = (
            ImageTextDataset(good[: self.val_size], center_crop=True, random_flip=False, **common)
            if self.val_size
            else None
        )
        self.train_set = ImageTextDataset(
            good[self.val_size :],
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            cache=self.cache,
            seed=self.seed,
            renamer=self.renamer,
            name_dropout=self.name_dropout,
            **common,
        )
        if self.latent_store is not None:
            self.train_set.latent_store = self.latent_store

    def write_simple_prompts(self, rows: list[Row]) -> None:
        """``simple_from=llm``: the rewriter shortens each row's complex prompt (rows without one are left to
        ``check_prompts``, which skips and reports them)."""
        with_caption = [row for row in rows if isinstance(row.complex, str) and row.complex.strip()]
        for row, simple in zip(with_caption, self.rewriter.rewrite([r.complex for r in with_caption], task="simplify")):
            row.simple = simple
        print(
            f"data.simple_from=llm: {len(with_caption)} simple prompts written by {self.rewriter.pretrained}",
            flush=True,
        )

    def setup_streaming(self) -> None:
        if self.cache != "off":
            raise ValueError("data.cache is for map-style data; WebDataset shards are streamed: set data.cache=off")
        limit = PromptLimit(self.tokenizer)
        urls = webdataset_urls(self.root)
        common = {
            "urls": urls,
            "image_key": None if self.image_key == "file_name" else self.image_key,
            "simple_key": self.simple_key,
            "complex_key": self.complex_key,
            "limit": limit,
            "resolution": self.resolution,
            "simple_prompt": self.simple_prompt,
            "max_image_pixels": self.max_image_pixels,
            "min_image_side": self.min_image_side,
        }
        val_keys: list = []
        if self.val_size:
            val = StreamingImageTextDataset(center_crop=True, random_flip=False, **common)
            # The first val_size raw samples of the first shard(s): read once to know their keys.
            for sample in val.raw_samples():
                val_keys.append(sample["__key__"])
                if len(val_keys) == self.val_size:
                    break
            self.val_set = StreamingImageTextDataset(
                center_crop=True, random_flip=False, max_samples=self.val_size, **common
            )
        self.train_set = StreamingImageTextDataset(
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            shuffle_buffer=self.shuffle_buffer,
            exclude=frozenset(val_keys),
            **common,
        )

    def skip_rows(self, reasons: dict[str, str]) -> None:
        """Drop rows (by ``where``) found unusable after setup, e.g. by the cache builder; each is reported."""
        if not reasons:
            return
        for dataset in (self.train_set, self.val_set):
            if dataset is None:
                continue
            for row in dataset.rows:
                if row.where in reasons:
                    self.report.skip(row.where, row.id, reasons[row.where])
            dataset.rows = [row for row in dataset.rows if row.where not in reasons]
        if not self.train_set.rows:
            raise ValueError(f"no training rows left after skipping {len(reasons)}\n{self.report}")
        self.write_report()

    def all_rows(self) -> list[Row]:
        return list(self.train_set.rows) + (list(self.val_set.rows) if self.val_set else [])

    # ---------------------------------------------------------------- what the feature cache asks (data.cache)

    def cache_images(self) -> list[tuple[Row, tuple[str, ...]]]:
        """(row, variants) for every image whose latents training and validation read: a training row in every
        flip variant it may be drawn with, a validation row plain."""
        jobs = [(row, image_variants(self.random_flip)) for row in self.train_set.rows]
        if self.val_set is not None:
            jobs += [(row, image_variants(False)) for row in self.val_set.rows]
        return jobs

    def image_content(self, row: Row) -> str:
        """The content hash of a row's image bytes (half of its cache key); ``BadImage`` if it cannot be read."""
        return content_hash(self.train_set.image_bytes(row))

    def cache_pixels(self, row: Row, variant: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """([3, R, R] the image as the VAE encodes it for ``variant`` (centre crop, flipped for ``*_flip``),
        its ``original_size`` and ``crop_top_left`` [2] for SDXL's micro-conditioning)."""
        image, _ = load_rgb(self.train_set.image_bytes(row), self.max_image_pixels, self.min_image_side)
        return preprocess_with_geometry(image, self.resolution, True, variant.endswith("flip"))

    def cache_prompts(self) -> tuple[list[str], list[tuple[str, Row]]]:
        """The prompts whose states the current rows need: (CLIP prompts: every simple prompt, renamed variant,
        complex prompt and rewrite; LLM prompts: every simple prompt and renamed variant with its first row)."""
        rows = self.all_rows()
        renamed = self.renamed_prompts()
        clip = [r.simple for r in rows] + [p for p, _ in renamed] + [r.complex for r in rows]
        # The LLM's rewrites too, when the alignment loss targets them (loss.align_target=rewrite|both).
        clip += [r.rewrite for r in rows if r.rewrite is not None]
        llm: dict[str, Row] = {}
        for row in rows:
            llm.setdefault(row.simple, row)
        for prompt, row in renamed:
            llm.setdefault(prompt, row)
        return clip, list(llm.items())

    def use_precomputed_llm(self, features: PrecomputedLLMFeatures) -> None:
        """The model reads its LLM states from ``features`` (``llm=precomputed``, with the cache off): at setup, the
        rows whose simple prompt has no vector there are skipped and reported."""
        self.precomputed_llm = features

    def use_latent_store(self, store) -> None:
        """Read training and validation latents from ``store`` (a ``cache.FeatureStore``) instead of decoding and encoding images."""
        self.latent_store = store
        for dataset in (self.train_set, self.val_set):
            if dataset is not None:
                dataset.latent_store = store

    # ---------------------------------------------------------------- the report

    def write_report(self) -> Path | None:
        if self.report_dir is None:
            return None
        return self.report.write(Path(self.report_dir) / "data_report.json")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Rows that failed in a dataloader worker reach the report here, in the main process.
        self.report.extend(batch.pop("data_events", []))
        if self.train_sampler is not None and self.trainer is not None and self.trainer.training:
            # This batch reaches the training step now (the loader itself runs a batch ahead).
            self.train_sampler.consumed += len(batch["id"])
        return batch

    def teardown(self, stage: str | None = None) -> None:
        path = self.write_report()
        if self.trainer is not None:
            self.report.log_to(self.trainer.loggers)
            if self.report.events["skipped"] or self.report.events["truncated"]:
                log.info(f"{self.report}\n  report: {path}")

    # ---------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        common = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "drop_last": True,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }
        if isinstance(self.train_set, IterableDataset):
            return DataLoader(self.train_set, **common)
        # Each rank reads its share of one seeded order itself (the trainer runs with
        # use_distributed_sampler=false), and the order resumes mid-epoch: see EpochSampler.
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.train_sampler = EpochSampler(
            len(self.train_set), seed=self.seed, rank=rank, world_size=world_size, weights=self.balance_weights()
        )
        # Its own generator for the workers' base seed, so creating an iterator (as a resume does) leaves
        # the global RNG alone.
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(self.train_set, sampler=self.train_sampler, generator=generator, **common)

    def balance_weights(self) -> list[float] | None:
        """One weight per training row, 1 / (rows sharing its ``balance_by`` value), or None when not balancing."""
        if self.balance_by is None:
            return None
        values = []
        for row in self.train_set.rows:
            if self.balance_by not in row.extra:
                raise KeyError(
                    f"data.balance_by={self.balance_by!r}: {row.where} has no such column (it has {sorted(row.extra)})"
                )
            values.append(str(row.extra[self.balance_by]))
        counts = Counter(values)
        self.report.balanced = {
            "by": self.balance_by,
            "rows": dict(sorted(counts.items())),
            "share": {value: round(1 / len(counts), 4) for value in sorted(counts)},
        }
        log.info(f"data.balance_by={self.balance_by}: rows per value {self.report.balanced['rows']}, equal shares")
        return [1.0 / counts[value] for value in values]

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed),
        )
