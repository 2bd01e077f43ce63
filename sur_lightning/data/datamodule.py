"""Image + (simple prompt, complex prompt) data from any of the formats in ``formats.py``, with no silent loss.

Batches are dicts::

    pixel_values   [B, 3, R, R] float in [-1, 1]     (absent when the latents come from the cache)
    latent_mean    [B, 4, R/f, R/f]                  cached VAE posterior mean  (only with data.cache)
    latent_logvar  [B, 4, R/f, R/f]                  cached VAE posterior log-variance
    simple_prompt  list[str]  (B)   with name dropout (training rows only), some renamed: "a pair of sukebs"
    complex_prompt list[str]  (B)
    id             list[str]  (B)   the row's file name (or table row number)

Every row is checked before training: unreadable metadata lines, missing or empty prompts, duplicate
file names, missing files, images that are not images, decompression bombs, tiny or truncated images
are skipped; CMYK/RGBA/palette/16-bit/grayscale images are converted and EXIF rotation applied;
prompts over the tokenizer's limit are cut at a word boundary. Each is counted in ``data_report.json``
(written beside the run) and in the W&B summary. A row that still fails to decode while training is
replaced by the next good row and reported the same way.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torchvision.transforms import functional as TF

from sur_lightning.data.formats import (
    Row,
    detect_format,
    folder_root,
    load_table,
    read_folder,
    read_table,
    table_image_bytes,
    webdataset_row,
    webdataset_urls,
)
from sur_lightning.data.images import MAX_IMAGE_PIXELS, BadImage, check_image, load_rgb
from sur_lightning.data.report import DataReport

CACHE_MODES = ("auto", "require", "off")


class CacheMissError(KeyError):
    """``data.cache=require`` and an entry is missing; the message names the entry's key and row."""


def content_hash(data: bytes | str) -> str:
    """sha256 of image bytes or prompt text: the content half of a cache key."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def image_variants(random_flip: bool) -> tuple[str, ...]:
    """The crop/flip variants training uses (and the cache stores) per image."""
    return ("center", "center_flip") if random_flip else ("center",)


def preprocess(image, resolution: int, center_crop: bool, flip: bool, rng=random) -> torch.Tensor:
    """diffusers' text-to-image preprocessing: resize the short side, crop, flip, scale to [-1, 1]. [3, R, R]

    ``rng`` (a ``random.Random``, or the module) places a random crop."""
    image = TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR)
    if center_crop:
        image = TF.center_crop(image, resolution)
    else:
        top = rng.randint(0, image.height - resolution)
        left = rng.randint(0, image.width - resolution)
        image = TF.crop(image, top, left, resolution, resolution)
    if flip:
        image = TF.hflip(image)
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5])


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

    ``renamer`` (a ``sur_lightning.knowledge.rag.NameDropout``) with ``name_dropout`` p > 0: with probability p the
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
        example = {"simple_prompt": row.simple if simple is None else simple, "complex_prompt": row.complex, "id": row.id}
        if row.rewrite is not None:
            example["rewrite_prompt"] = row.rewrite
        if self.latent_store is not None:
            variant = image_variants(True)[int(flip)]
            key = self.latent_store.key(content_hash(data), variant)
            entry = self.latent_store.get(key)
            if entry is not None:
                example["latent_mean"], example["latent_logvar"] = entry["mean"], entry["logvar"]
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
        example["pixel_values"] = preprocess(image, self.resolution, self.center_crop, flip, rng)
        return example


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
        return {
            "pixel_values": preprocess(image, self.resolution, self.center_crop, flip),
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
    if all(cached):
        batch["latent_mean"] = torch.stack([e["latent_mean"] for e in examples])
        batch["latent_logvar"] = torch.stack([e["latent_logvar"] for e in examples])
    elif any(cached):
        raise RuntimeError("a batch mixes cached latents and images: the feature cache changed while training")
    else:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples]).contiguous()
    return batch


class EpochSampler(Sampler[tuple[int, int]]):
    """One rank's share of a seeded permutation per epoch, resumable mid-epoch.

    Epoch e's order is ``randperm(num_samples)`` seeded with ``seed + e`` (without ``shuffle``: 0..n-1),
    the same for every world size, cut to a multiple of ``world_size``; rank r reads ``order[r::world_size]``
    as DistributedSampler does. So batch k of size B on each of W ranks holds exactly the samples of
    batch k of size W·B in one process — what makes a DDP run equal to one process with the doubled
    batch. (Lightning's own DistributedSampler would shuffle with another generator than the one-process
    RandomSampler, so the two would see different data.)

    Yields (epoch, index): ``ImageTextDataset`` keys a row's flip and crop by the epoch.
    ``consumed``: samples of this epoch that reached the training step (counted by the datamodule, not
    by ``__iter__``, because Lightning fetches a batch ahead). ``state_dict`` is (epoch, consumed); after
    ``load_state_dict`` the next ``__iter__`` starts at the first sample not yet trained on.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} is outside world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"EpochSampler: {num_samples} training rows cannot be shared by {world_size} processes")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in training order."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        return order[: len(self) * self.world_size][self.rank :: self.world_size].tolist()

    def __iter__(self):
        epoch = self.epoch
        for index in self.order(epoch)[self.consumed :]:
            yield epoch, index

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a new epoch starts from its first sample."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_samples"], state["world_size"]) != (self.num_samples, self.world_size):
            raise ValueError(
                f"ckpt_path: the checkpoint was written with {state['num_samples']} training rows on {state['world_size']} "
                f"process(es), this run has {self.num_samples} on {self.world_size}: the data order cannot be resumed mid-epoch"
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        if self.consumed >= len(self):
            # Saved after the epoch's last batch: Lightning resumes with the next epoch.
            self.epoch, self.consumed = self.epoch + 1, 0


class ResumableDataLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` with its ``state_dict``: Lightning saves it in every checkpoint
    (the fit loop's ``combined_loader`` state) and loads it back on ``ckpt_path=...``, before the first
    batch, so a run resumed mid-epoch goes on with the next batch of the same order."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class ImageTextDataModule(L.LightningDataModule):
    """Train/validation split of one dataset; ``val_size`` rows are held out (deterministic by ``seed``).

    root:          a folder with metadata.jsonl/.csv, parquet or arrow file(s) or folder, .tar shards
                   (or a brace pattern), or a hub dataset id; ``format`` says which when ``auto`` cannot tell.
    image_key:     the column (or metadata field) holding the image or its file name.
    simple_key, complex_key: the prompt columns; ``simple_key: null`` takes the simple prompt from
                   ``simple_prompt``, a callable ``(row, image_bytes) -> str | None`` (see ``pokemon.py``).
    simple_from:   ``llm``: the rewriter writes every row's simple prompt from its complex one (its
                   ``simplify`` template), for datasets with detailed captions only; null: ``simple_key``/``simple_prompt``.
    rewriter:      a ``sur_lightning.rewrite.PromptRewriter``, for ``simple_from=llm`` and ``rewrite``.
    rewrite:       attach the rewriter's detailed rewrite of every simple prompt (batch key ``rewrite_prompt``),
                   the alignment target of ``loss.align_target=rewrite|both``.
    tokenizer:     a Stable Diffusion folder or hub id; prompts over its ``tokenizer/`` limit are cut and counted.
    pin_memory:    page-locked training batches (null: when CUDA is present).
    cache:         auto | require | off, with ``cache_dir``: see ``sur_lightning/cache.py``.
    report_dir:    where ``data_report.json`` is written (the run's folder).
    name_dropout, name_variants, name_knowledge_base: name dropout for the training rows (p, K and the
                   knowledge base whose "Name (plural)" titles are the names; see ``sur_lightning.knowledge.rag.NameDropout``).
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
    ) -> None:
        super().__init__()
        if cache not in CACHE_MODES:
            raise ValueError(f"data.cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache != "off" and not center_crop:
            raise ValueError("data.cache stores one latent per crop: it needs data.center_crop=true (random_flip is fine)")
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
            raise ValueError("data.simple_from=llm and loss.align_target=rewrite|both need a rewriter (conf/rewriter): got none")
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
        self.name_dropout = float(name_dropout or 0.0)
        self.renamer = self.name_renamer(name_variants, name_knowledge_base)
        self.report = DataReport()
        self.train_set = None
        self.val_set = None
        self.latent_store = None
        self.train_sampler: EpochSampler | None = None

    def name_renamer(self, variants: int, knowledge_base: str | None):
        """The ``NameDropout`` of the training rows; None without name dropout."""
        if not 0.0 <= self.name_dropout <= 1.0:
            raise ValueError(f"data.name_dropout is a probability in [0, 1], got {self.name_dropout}")
        if not self.name_dropout:
            return None
        if self.format == "webdataset":
            raise ValueError("name dropout renames each row's K fixed variants, for map-style data: WebDataset shards are streamed")
        if knowledge_base is None:
            raise ValueError(
                f"data.name_dropout={self.name_dropout} renames objects in the prompt and in its retrieved fact: it needs "
                "retrieval (+llm/rag=toyworld), whose llm.rag.knowledge_base names them (data.name_knowledge_base)"
            )
        from sur_lightning.knowledge.rag import NameDropout

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
        llm = getattr(getattr(self.trainer, "lightning_module", None), "llm", None) if self.trainer else None
        if hasattr(llm, "missing_prompts"):
            # Precomputed LLM features (SURD's prompt2vec): a prompt absent from the file is a skipped row.
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
        self.val_set = ImageTextDataset(good[: self.val_size], center_crop=True, random_flip=False, **common) if self.val_size else None
        self.train_set = ImageTextDataset(
            good[self.val_size :], center_crop=self.center_crop, random_flip=self.random_flip, cache=self.cache,
            seed=self.seed, renamer=self.renamer, name_dropout=self.name_dropout, **common,
        )
        if self.latent_store is not None:
            self.train_set.latent_store = self.latent_store

    def write_simple_prompts(self, rows: list[Row]) -> None:
        """``simple_from=llm``: the rewriter shortens each row's complex prompt (rows without one are left to
        ``check_prompts``, which skips and reports them)."""
        with_caption = [row for row in rows if isinstance(row.complex, str) and row.complex.strip()]
        for row, simple in zip(with_caption, self.rewriter.rewrite([r.complex for r in with_caption], task="simplify")):
            row.simple = simple
        print(f"data.simple_from=llm: {len(with_caption)} simple prompts written by {self.rewriter.pretrained}", flush=True)

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
            self.val_set = StreamingImageTextDataset(center_crop=True, random_flip=False, max_samples=self.val_size, **common)
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
                print(f"{self.report}\n  report: {path}")

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
        self.train_sampler = EpochSampler(len(self.train_set), seed=self.seed, rank=rank, world_size=world_size)
        # Its own generator for the workers' base seed, so creating an iterator (as a resume does) leaves
        # the global RNG alone.
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(self.train_set, sampler=self.train_sampler, generator=generator, **common)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed),
        )
