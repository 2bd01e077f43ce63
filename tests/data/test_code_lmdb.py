"""The code database (sur_lightning/data/code_lmdb.py): resumable extraction, lock-free reading, bad rows reported."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sur_lightning.data.code_lmdb import CodeDataset, extract_codes
from sur_lightning.data.datasets import collate

GOOD = 18  # usable rows in the fixture folder


class PatchTokenizer:
    """A stand-in tokenizer: the mean grey level of each 4x4 patch, in 16 levels. 16 px images -> codes [4, 4]."""

    codebook_size = 16

    def __init__(self, name: str = "patch-v1") -> None:
        self.name = name
        self.encoded = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        grey = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 4)[:, 0]  # [B, 4, 4] in [-1, 1]
        return ((grey + 1) / 2 * 15).round().long()

    def fingerprint(self) -> str:
        return self.name


def expected_codes(image: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    return PatchTokenizer().encode(array[None])[0]


@pytest.fixture()
def folder(tmp_path) -> Path:
    """18 good rows, plus a corrupt image, a missing file, a row without its simple prompt and a duplicate."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(GOOD):
        name = f"img{index:02d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name)
        rows.append({"file_name": name, "text": f"simple {index}", "prompt": f"complex {index}"})
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    rows.append({"file_name": "corrupt.png", "text": "a", "prompt": "b"})
    rows.append({"file_name": "absent.png", "text": "a", "prompt": "b"})
    Image.new("RGB", (16, 16)).save(root / "noprompt.png")
    rows.append({"file_name": "noprompt.png", "prompt": "b"})
    rows.append(rows[0])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def assert_every_good_row_once(out: Path, folder: Path) -> None:
    dataset = CodeDataset(out)
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    assert sorted(ids) == [f"img{i:02d}.png" for i in range(GOOD)], "every good row exactly once"
    for i in range(len(dataset)):
        example = dataset[i]
        index = int(example["id"][3:5])
        assert example["simple_prompt"] == f"simple {index}" and example["complex_prompt"] == f"complex {index}"
        assert torch.equal(example["codes"], expected_codes(Image.open(folder / example["id"]))), example["id"]


def test_an_interrupted_extraction_resumes_without_losing_or_repeating_a_row(folder, tmp_path):
    out = tmp_path / "codes"

    def stop_after_two_batches(written: int) -> None:
        if written >= 8:
            raise KeyboardInterrupt

    first = PatchTokenizer()
    with pytest.raises(KeyboardInterrupt):
        extract_codes(
            str(folder), out, first, resolution=16, batch_size=4, progress=False, on_batch=stop_after_two_batches
        )
    assert len(CodeDataset(out)) == 8
    second = PatchTokenizer()
    done = extract_codes(str(folder), out, second, resolution=16, batch_size=4, progress=False)
    assert (done.present, done.written) == (8, GOOD - 8)
    assert second.encoded == GOOD - 8, "rows already written are not encoded again"
    assert_every_good_row_once(out, folder)
    again = extract_codes(str(folder), out, PatchTokenizer(), resolution=16, batch_size=4, progress=False)
    assert (again.present, again.written) == (GOOD, 0)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_code_lmdb import PatchTokenizer
from sur_lightning.data.code_lmdb import extract_codes

class DiesMidBatch(PatchTokenizer):
    def encode(self, images):
        if self.encoded >= 8:  # the third batch: encoded, never committed
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(images)

extract_codes({root!r}, {out!r}, DiesMidBatch(), resolution=16, batch_size=4, progress=False)
"""


def test_a_killed_extraction_resumes_without_losing_or_repeating_a_row(folder, tmp_path):
    out = tmp_path / "codes"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), root=str(folder), out=str(out))
    # The child imports this checkout's package, wherever the installed one lives.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    killed = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert killed.returncode == -9, killed.stderr
    assert len(CodeDataset(out)) == 8, "the two committed batches survive the kill, the third is gone whole"
    done = extract_codes(str(folder), out, PatchTokenizer(), resolution=16, batch_size=4, progress=False)
    assert (done.present, done.written) == (8, GOOD - 8)
    assert_every_good_row_once(out, folder)


def test_bad_rows_are_named_in_the_data_report(folder, tmp_path):
    out = tmp_path / "codes"
    done = extract_codes(str(folder), out, PatchTokenizer(), resolution=16, batch_size=8, progress=False)
    report = json.loads((out / "data_report.json").read_text())
    assert report == done.report.to_dict()
    assert report["counts"]["rows"] == GOOD + 4 and report["counts"]["skipped"] == 4
    reasons = {event["id"]: (event["row"], event["reason"]) for event in report["skipped"]}
    assert reasons["corrupt.png"] == ("metadata.jsonl:19", "not an image (unidentified format)")
    assert reasons["absent.png"][1].startswith("file not found")
    assert reasons["noprompt.png"] == ("metadata.jsonl:21", "missing simple prompt ('text')")
    assert reasons["img00.png"] == ("metadata.jsonl:22", "duplicate file_name 'img00.png', first at metadata.jsonl:1")


def test_resuming_with_another_tokenizer_is_refused(folder, tmp_path):
    out = tmp_path / "codes"
    extract_codes(str(folder), out, PatchTokenizer(), resolution=16, batch_size=8, progress=False)
    with pytest.raises(
        ValueError, match=r"codes was written with other settings \(tokenizer: database 'patch-v1', now 'patch-v2'\)"
    ):
        extract_codes(str(folder), out, PatchTokenizer("patch-v2"), resolution=16, batch_size=8, progress=False)


def test_the_dataset_reads_a_read_only_copy_and_collates_codes(folder, tmp_path):
    out = tmp_path / "codes"
    extract_codes(str(folder), out, PatchTokenizer(), resolution=16, batch_size=8, progress=False)
    # Only the data file, on a read-only folder: readers take no lock and write nothing.
    copy = tmp_path / "read-only"
    copy.mkdir()
    shutil.copy(out / "data.mdb", copy / "data.mdb")
    (copy / "data.mdb").chmod(stat.S_IRUSR)
    copy.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        dataset = CodeDataset(copy, keys=["img03.png", "img01.png"])
        assert len(dataset) == 2 and dataset[(5, 1)]["id"] == "img01.png"  # an EpochSampler key reads the index
        batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate)))
        assert batch["codes"].shape == (2, 4, 4) and batch["codes"].dtype == torch.int64
        assert batch["id"] == ["img03.png", "img01.png"] and batch["simple_prompt"] == ["simple 3", "simple 1"]
        assert pickle.loads(pickle.dumps(dataset))[0]["id"] == "img03.png", "a dataset travels to workers as its path"
        with pytest.raises(KeyError, match="has no rows"):
            CodeDataset(copy, keys=["nope.png"])
    finally:
        copy.chmod(stat.S_IRWXU)
