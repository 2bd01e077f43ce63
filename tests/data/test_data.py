"""Data: every format gives identical batches, the bad-input corpus trains and is fully reported,
pokemon-llava simple-prompt sources, SURD's precomputed LLM features."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sur_lightning.data.datamodule import ImageTextDataModule
from sur_lightning.data.datasets import collate
from sur_lightning.data.report import DataReport
from sur_lightning.data.synthetic import generate_dataset


def examples_by_id(datamodule) -> dict:
    """Every training example of a datamodule (map-style or streamed), keyed by id."""
    dataset = datamodule.train_set
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    items = list(dataset) if streamed else [dataset[i] for i in range(len(dataset))]
    return {e["id"]: e for e in items}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("shapes"), num_images=6, image_size=32, seed=1)


def write_copies(folder: Path, out: Path) -> dict[str, Path]:
    """The same generated dataset as metadata.csv folder, parquet, arrow and WebDataset shards."""
    import datasets

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    csv_dir = out / "csv"
    csv_dir.mkdir()
    lines = ["file_name,text,prompt"] + [f'{r["file_name"]},{r["text"]},"{r["prompt"]}"' for r in rows]
    (csv_dir / "metadata.csv").write_text("\n".join(lines) + "\n")
    for r in rows:
        (csv_dir / r["file_name"]).write_bytes((folder / r["file_name"]).read_bytes())
    table = datasets.Dataset.from_dict(
        {
            "image": [str(folder / r["file_name"]) for r in rows],
            "file_name": [r["file_name"] for r in rows],
            "text": [r["text"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
        }
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(out / "data.parquet"))
    table.save_to_disk(str(out / "arrow"))
    shards = out / "shards"
    shards.mkdir()
    for shard, start in enumerate(range(0, len(rows), 4)):
        with tarfile.open(shards / f"shard-{shard:06d}.tar", "w") as tar:
            for r in rows[start : start + 4]:
                key = Path(r["file_name"]).stem
                for name, data in (
                    (f"{key}.png", (folder / r["file_name"]).read_bytes()),
                    (f"{key}.json", json.dumps(r).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"csv": csv_dir, "parquet": out / "data.parquet", "arrow": out / "arrow", "webdataset": shards}


def test_every_format_round_trips_to_identical_batches(shapes, tmp_path):
    common = {"resolution": 32, "batch_size": 2, "val_size": 0, "image_key": "file_name"}
    reference = ImageTextDataModule(str(shapes), **common)
    reference.setup("fit")
    expected = examples_by_id(reference)
    assert len(expected) == 6
    for name, root in write_copies(shapes, tmp_path).items():
        image_key = "image" if name in ("parquet", "arrow") else "file_name"
        datamodule = ImageTextDataModule(str(root), **{**common, "image_key": image_key})
        datamodule.setup("fit")
        got = examples_by_id(datamodule)
        assert sorted(got) == sorted(expected), name
        for key, example in expected.items():
            assert torch.equal(got[key]["pixel_values"], example["pixel_values"]), (name, key)
            assert got[key]["simple_prompt"] == example["simple_prompt"], (name, key)
            assert got[key]["complex_prompt"] == example["complex_prompt"], (name, key)
        batch = collate([got[k] for k in sorted(got)[:2]])
        assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].abs().max() <= 1


# ------------------------------------------------------------------------------- the bad-input corpus


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decompression_bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid tiny PNG whose header claims width x height: what a decompression bomb looks like on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 1)  # one row; the rest is never decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def build_bad_corpus(root: Path) -> dict[str, str]:
    """A SURD-layout folder with every kind of bad input; returns {where: expected reason fragment} of skipped rows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    files = {
        "good_0.png": png_bytes(photo),
        "good_1.png": png_bytes(photo.transpose(Image.FLIP_LEFT_RIGHT)),
        "good_2.png": png_bytes(photo.rotate(90, expand=True)),
        "rgba.png": png_bytes(photo.convert("RGBA")),
        "palette.png": png_bytes(photo.convert("P")),
        "gray.png": png_bytes(photo.convert("L")),
        "sixteen.png": png_bytes(Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)),
        "truncated.png": png_bytes(photo)[:300],
        "not_an_image.png": b"this is a text file, not a picture\n",
        "one_pixel.png": png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))),
        "bomb.png": decompression_bomb_png(),
        "long_prompt.png": png_bytes(photo),
        "empty_prompt.png": png_bytes(photo),
        "no_prompt.png": png_bytes(photo),
    }
    cmyk = io.BytesIO()
    photo.convert("CMYK").save(cmyk, format="JPEG")
    files["cmyk.jpg"] = cmyk.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    photo.save(rotated, format="JPEG", exif=exif)
    files["exif_rotated.jpg"] = rotated.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)

    def line(name, text="a small picture", prompt="a detailed description of a small picture"):
        return json.dumps({"file_name": name, "text": text, "prompt": prompt}).encode()

    lines = [
        line(n)
        for n in (
            "good_0.png",
            "good_1.png",
            "good_2.png",
            "rgba.png",
            "palette.png",
            "gray.png",
            "sixteen.png",
            "cmyk.jpg",
            "exif_rotated.jpg",
            "truncated.png",
            "not_an_image.png",
            "missing.png",
            "one_pixel.png",
            "bomb.png",
        )
    ]
    lines.append(line("long_prompt.png", prompt="word " * 2000))  # 10,000 characters
    lines.append(line("empty_prompt.png", text=""))
    lines.append(json.dumps({"file_name": "no_prompt.png", "prompt": "a complex prompt only"}).encode())
    lines.append('{"file_name": "latin1.png", "text": "caf\xe9"}'.encode("latin-1"))
    lines.append(b'{"file_name": "broken.png", "text": ')
    lines.append(line("good_0.png", text="the same file again"))
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {
        "metadata.jsonl:10": "truncated",
        "metadata.jsonl:11": "not an image",
        "metadata.jsonl:12": "file not found",
        "metadata.jsonl:13": "smaller than",
        "metadata.jsonl:14": "decompression-bomb",
        "metadata.jsonl:16": "empty simple prompt",
        "metadata.jsonl:17": "missing simple prompt",
        "metadata.jsonl:18": "not UTF-8",
        "metadata.jsonl:19": "malformed JSON",
        "metadata.jsonl:20": "duplicate",
    }


def test_bad_input_corpus_is_skipped_repaired_and_reported(tmp_path, tiny_sd):
    expected = build_bad_corpus(tmp_path / "bad")
    datamodule = ImageTextDataModule(
        str(tmp_path / "bad"),
        resolution=32,
        batch_size=2,
        val_size=2,
        tokenizer=tiny_sd,
        report_dir=str(tmp_path / "run"),
    )
    datamodule.setup("fit")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    skipped = {e["row"]: e["reason"] for e in report["skipped"]}
    assert set(skipped) == set(expected)
    for where, fragment in expected.items():
        assert fragment in skipped[where], (where, skipped[where])
    repaired = {e["id"]: e["reason"] for e in report["repaired"]}
    assert "converted CMYK to RGB" in repaired["cmyk.jpg"]
    assert "alpha composited on white" in repaired["rgba.png"]
    assert {"palette.png", "gray.png", "sixteen.png"} <= set(repaired)
    assert "EXIF orientation 6" in repaired["exif_rotated.jpg"]
    [truncated] = report["truncated"]
    assert truncated["id"] == "long_prompt.png" and "cut to 77" in truncated["reason"]
    assert report["counts"] == {"rows": 20, "used": 10, "skipped": 10, "repaired": 6, "truncated": 1}
    rows = {row.id: row for row in datamodule.all_rows()}
    assert len(rows["long_prompt.png"].complex.split()) < 77

    # Repairs give real pictures: 16-bit is rescaled, not clipped to white; EXIF rotation is applied.
    dataset = (
        datamodule.train_set if any(r.id == "sixteen.png" for r in datamodule.train_set.rows) else datamodule.val_set
    )
    index = [r.id for r in dataset.rows].index("sixteen.png")
    assert dataset[index]["pixel_values"].std() > 0.1
    from sur_lightning.data.images import load_rgb

    image, _repairs = load_rgb((tmp_path / "bad" / "exif_rotated.jpg").read_bytes())
    assert image.size == (40, 48) and image.mode == "RGB"


def test_bad_corpus_trains_and_the_run_reports_every_bad_row(tmp_path, compose):
    from conftest import tiny_overrides

    from sur_lightning.train import train

    expected = build_bad_corpus(tmp_path / "bad")
    overrides = [o for o in tiny_overrides(tmp_path, tmp_path.parent / "cache") if not o.startswith("data")]
    cfg = compose(
        *overrides,
        "data=folder",
        f"data.root={tmp_path / 'bad'}",
        "data.resolution=64",
        "data.batch_size=2",
        "data.val_size=2",
        "data.num_workers=0",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "callbacks.sample_grid.every_n_steps=null",
        "~callbacks.sample_grid",
        tiny=False,
    )
    train(cfg)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert {e["row"] for e in report["skipped"]} == set(expected)
    assert report["counts"]["truncated"] == 1


def test_a_row_that_fails_to_decode_while_training_is_replaced_and_reported(tmp_path, shapes):
    root = tmp_path / "late"
    root.mkdir()
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        (root / r["file_name"]).write_bytes((shapes / r["file_name"]).read_bytes())
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datamodule = ImageTextDataModule(str(root), resolution=32, batch_size=2, val_size=0)
    datamodule.setup("fit")
    # Corrupted after the scan (a truncated JPEG passes verify() the same way).
    victim = datamodule.train_set.rows[0]
    (root / victim.image).write_bytes(b"gone")
    example = datamodule.train_set[0]
    assert example["id"] == datamodule.train_set.rows[1].id
    batch = datamodule.on_before_batch_transfer(collate([example, datamodule.train_set[2]]), 0)
    assert "data_events" not in batch
    [event] = datamodule.report.events["skipped"]
    assert event["row"] == victim.where and "not an image" in event["reason"]


def test_report_goes_to_the_wandb_summary_and_other_loggers():
    class Run:
        summary: dict

    class WandbLogger:
        def __init__(self):
            self.experiment = Run()
            self.experiment.summary = {}

    class CSVLogger:
        def __init__(self):
            self.metrics = {}

        def log_metrics(self, metrics):
            self.metrics.update(metrics)

    report = DataReport()
    report.rows = 3
    report.skip("metadata.jsonl:2", "b.png", "file not found")
    report.skip("metadata.jsonl:2", "b.png", "file not found")  # met again next epoch: counted once
    report.truncate("metadata.jsonl:3", "c.png", "complex prompt: 200 tokens cut to 77")
    wandb, csv = WandbLogger(), CSVLogger()
    report.log_to([wandb, csv])
    assert wandb.experiment.summary["data/skipped_rows"] == [
        {"row": "metadata.jsonl:2", "id": "b.png", "reason": "file not found"}
    ]
    assert wandb.experiment.summary["data/used"] == 2
    assert csv.metrics == {
        "data/rows": 3.0,
        "data/used": 2.0,
        "data/skipped": 1.0,
        "data/repaired": 0.0,
        "data/truncated": 1.0,
    }


# ------------------------------------------------------------------------------- pokemon-llava and SURD


def test_pokemon_llava_parquet_with_each_simple_prompt_source(tmp_path, shapes):
    import datasets

    from sur_lightning.data.pokemon import FirstClause, PairedCaptions, first_clause, write_pairing

    assert first_clause("The image features a cartoon pink bird with big eyes, standing.") == "a cartoon pink bird"
    names = sorted(p.name for p in shapes.glob("*.png"))
    llava = [f"The image shows a {i} small creature, drawn in flat colours." for i in range(len(names))]
    datasets.Dataset.from_dict({"image": [str(shapes / n) for n in names], "text": llava}).cast_column(
        "image", datasets.Image()
    ).to_parquet(str(tmp_path / "0000.parquet"))
    # The BLIP captions of the same images, re-encoded as JPEG-free PNG copies in another folder.
    blip = tmp_path / "blip"
    blip.mkdir()
    for i, name in enumerate(names):
        Image.open(shapes / name).save(blip / f"b{i}.png", optimize=True)
    (blip / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"b{i}.png", "text": f"blip {i}"}) + "\n" for i in range(len(names)))
    )
    pairing = write_pairing(str(blip), str(tmp_path / "pairs.jsonl"), image_key="file_name")

    common = {
        "root": str(tmp_path / "0000.parquet"),
        "image_key": "image",
        "simple_key": None,
        "complex_key": "text",
        "resolution": 32,
        "val_size": 0,
    }
    by_clause = ImageTextDataModule(simple_prompt=FirstClause(), **common)
    by_clause.setup("fit")
    assert {r.simple for r in by_clause.all_rows()} == {f"a {i} small creature" for i in range(len(names))}
    paired = ImageTextDataModule(simple_prompt=PairedCaptions(str(pairing)), **common)
    paired.setup("fit")
    assert {(r.id, r.simple) for r in paired.all_rows()} == {(f"{i:06d}", f"blip {i}") for i in range(len(names))}


def test_pokemon_llava_config_composes(compose):
    cfg = compose("data=pokemon_llava", tiny=False)
    assert cfg.data.root == "diffusers/pokemon-llava-captions"
    assert cfg.data.complex_key == "text" and cfg.data.image_key == "image"


def test_precomputed_llm_features_match_the_llm_and_name_missing_rows(tmp_path, llm, shapes):
    from sur_lightning.data.surd import MissingPrecomputedFeature, PrecomputedLLMFeatures, write_prompt2vec

    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    prompts = sorted({r["text"] for r in rows})
    path = write_prompt2vec(llm, prompts[1:], tmp_path / "prompt2vec" / "tiny" / "-1.pt")
    precomputed = PrecomputedLLMFeatures(str(path))
    states, mask = precomputed(prompts[1:3])
    expected, _ = llm(prompts[1:3])
    assert mask is None and states.shape == expected.shape == (2, llm.hidden_size)
    torch.testing.assert_close(states, expected.half().float(), rtol=0, atol=2e-3)
    with pytest.raises(MissingPrecomputedFeature, match="no precomputed LLM feature"):
        precomputed([prompts[0]])

    datamodule = ImageTextDataModule(str(shapes), resolution=32, val_size=0)
    datamodule.use_precomputed_llm(precomputed)  # as train() does with llm=precomputed and the cache off
    datamodule.setup("fit")
    skipped = datamodule.report.events["skipped"]
    assert skipped and all("not in" in e["reason"] and e["row"].startswith("metadata.jsonl:") for e in skipped)
    assert {r.simple for r in datamodule.all_rows()} == set(prompts[1:])


def surd_as_downloaded(shapes: Path, root: Path) -> Path:
    """SURD's layout: the dataset root holds ``train/`` with the images and metadata.jsonl; two rows name
    their image without its extension, as the authors' sample rows do."""
    train = root / "train"
    train.mkdir(parents=True)
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        (train / row["file_name"]).write_bytes((shapes / row["file_name"]).read_bytes())
        if i < 2:
            row["file_name"] = Path(row["file_name"]).stem
    (train / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_surd_dataset_root_reads_its_train_folder_and_resolves_extensionless_file_names(shapes, tmp_path, capsys):
    root = surd_as_downloaded(shapes, tmp_path / "SURD")
    stems = [json.loads(line)["file_name"] for line in (root / "train" / "metadata.jsonl").read_text().splitlines()[:2]]
    datamodule = ImageTextDataModule(str(root), resolution=32, val_size=0, report_dir=str(tmp_path / "run"))
    datamodule.setup("fit")
    assert f"reading the 'train' split folder {root / 'train'}" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["folder"] == str(root / "train")
    assert report["counts"]["used"] == 6 and not report["skipped"]
    repaired = {e["id"]: e["reason"] for e in report["repaired"]}
    assert {stem: repaired[stem] for stem in stems} == {
        stem: f"file_name {stem!r} has no extension: using {stem}.png" for stem in stems
    }
    # The repaired rows load the right image.
    dataset = datamodule.train_set
    for stem in stems:
        example = dataset[[r.id for r in dataset.rows].index(stem)]
        from sur_lightning.data.datasets import preprocess

        expected = preprocess(Image.open(shapes / f"{stem}.png"), 32, True, False)
        assert torch.equal(example["pixel_values"], expected)


def test_a_folder_without_metadata_names_both_places_it_looked(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "x.png").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"has no metadata.jsonl or metadata.csv, and neither has .*empty/train"
    ):
        ImageTextDataModule(str(tmp_path / "empty"), format="folder", resolution=32, val_size=0).setup("fit")


def test_epoch_sampler_ranks_split_the_one_process_batches_exactly():
    """Batch k of size 2 on each of 2 ranks holds the samples of batch k of size 4 in one process."""
    from sur_lightning.data.sampler import EpochSampler

    def batches(sampler, size):
        order = [index for _, index in sampler]
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    for epoch in (0, 3):
        single = EpochSampler(11, seed=5)
        ranks = [EpochSampler(11, seed=5, rank=r, world_size=2) for r in (0, 1)]
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        one, two = batches(single, 4), [batches(r, 2) for r in ranks]
        assert len(one) == len(two[0]) == len(two[1]) == 2  # 11 rows: 5 per rank, two whole batches
        assert all(sorted(one[k]) == sorted(two[0][k] + two[1][k]) for k in range(2))
    assert list(EpochSampler(11, seed=5)) != list(EpochSampler(11, seed=6))
    assert {epoch for epoch, _ in single} == {3}  # the dataset keys flips and crops by it


def test_flips_and_crops_are_keyed_by_epoch_and_row_not_by_the_global_rng(tmp_path):
    import random

    from sur_lightning.data.datamodule import ImageTextDataModule
    from sur_lightning.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "shapes", num_images=12, image_size=64)
    datamodule = ImageTextDataModule(str(root), resolution=48, val_size=0, center_crop=False, random_flip=True)
    datamodule.setup("fit")
    dataset = datamodule.train_set

    def pixels(epoch):
        return torch.stack([dataset[(epoch, i)]["pixel_values"] for i in range(len(dataset))])

    random.seed(0)
    first = pixels(0)
    random.seed(1)
    assert torch.equal(pixels(0), first)
    assert not torch.equal(pixels(1), first)  # another epoch, other flips and crops


def test_epoch_sampler_resumes_mid_epoch_and_refuses_another_layout():
    from sur_lightning.data.sampler import EpochSampler

    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.consumed = 4
    resumed = EpochSampler(10, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(2)  # Lightning sets the epoch again after loading: the position stays
    assert list(resumed) == full[4:]
    resumed.set_epoch(3)
    assert resumed.consumed == 0 and len(list(resumed)) == 10
    sampler.consumed = 10  # saved after the epoch's last batch: resume at the next epoch's start
    at_end = EpochSampler(10, seed=1)
    at_end.load_state_dict(sampler.state_dict())
    assert (at_end.epoch, at_end.consumed) == (3, 0)
    with pytest.raises(ValueError, match="10 training rows on 1 process.*9 on 1"):
        EpochSampler(9, seed=1).load_state_dict(sampler.state_dict())


def test_training_batches_are_page_locked_when_cuda_is_present_or_when_asked(shapes, monkeypatch):
    common = {"resolution": 32, "batch_size": 2, "val_size": 0}
    for cuda, pin_memory, expected in [
        (False, None, False),
        (True, None, True),
        (True, False, False),
        (False, True, True),
    ]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        datamodule = ImageTextDataModule(str(shapes), pin_memory=pin_memory, **common)
        datamodule.setup("fit")
        assert datamodule.train_dataloader().pin_memory is expected, (cuda, pin_memory)


def test_balance_by_gives_each_value_an_equal_share_resumably_and_names_a_missing_column(tmp_path, shapes):
    """data.balance_by=shape on 12 rows, 9 circles and 3 triangles: each shape is drawn about half the time, the draws
    repeat per (seed, epoch) and split across ranks as one process's; a row without the column is named."""
    import shutil
    from collections import Counter

    from sur_lightning.data.sampler import EpochSampler

    folder = tmp_path / "skewed"
    folder.mkdir()
    source = min(shapes.glob("*.png"))
    rows = []
    for i in range(12):
        shutil.copy(source, folder / f"{i:02d}.png")
        shape = "triangle" if i < 3 else "circle"
        rows.append({"file_name": f"{i:02d}.png", "text": f"a {shape}", "prompt": f"one red {shape}", "shape": shape})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    datamodule = ImageTextDataModule(
        str(folder), resolution=32, batch_size=4, val_size=0, balance_by="shape", report_dir=str(tmp_path)
    )
    datamodule.setup("fit")
    datamodule.train_dataloader()
    sampler = datamodule.train_sampler
    shape_of = {i: row.extra["shape"] for i, row in enumerate(datamodule.train_set.rows)}
    drawn = Counter()
    for epoch in range(50):
        sampler.set_epoch(epoch)
        drawn.update(shape_of[index] for _, index in sampler)
    assert 0.4 < drawn["triangle"] / sum(drawn.values()) < 0.6  # 0.25 unbalanced
    sampler.set_epoch(7)
    again = EpochSampler(12, seed=datamodule.seed, weights=datamodule.balance_weights())
    again.set_epoch(7)
    assert list(again) == list(sampler)
    ranks = [EpochSampler(12, seed=0, rank=r, world_size=2, weights=[1.0] * 3 + [1 / 3] * 9) for r in (0, 1)]
    single = EpochSampler(12, seed=0, weights=[1.0] * 3 + [1 / 3] * 9)
    assert sorted(i for _, i in single) == sorted(i for r in ranks for _, i in r)
    assert datamodule.write_report() is not None
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["balanced"] == {
        "by": "shape",
        "rows": {"circle": 9, "triangle": 3},
        "share": {"circle": 0.5, "triangle": 0.5},
    }

    missing = ImageTextDataModule(str(folder), resolution=32, batch_size=4, val_size=0, balance_by="object")
    missing.setup("fit")
    with pytest.raises(KeyError, match=r"data.balance_by='object': metadata.jsonl:\d+ has no such column"):
        missing.train_dataloader()
    with pytest.raises(ValueError, match="weights must be 3 non-negative"):
        EpochSampler(3, seed=0, weights=[1.0, -1.0, 1.0])
