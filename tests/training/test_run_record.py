"""The run folder as a user finds it (issue 32): ``ckpt_path=last`` resumes the newest run of the task in place,
the folder keeps the log and the evaluation report, and the offline W&B run holds the table, the images and
the adapter artifact. The training runs go through the real entry point (Hydra picks the run folder), with
tiny models."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import tiny_overrides, toy_demo_overrides

from sur_lightning.config import newest_run, run_dir

ROOT = Path(__file__).resolve().parents[2]


def cli_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` without ``paths.output_dir``, so that Hydra's run folder (``hydra.run.dir``) is the output."""
    return [o for o in overrides if not o.startswith("paths.output_dir")]


def wandb_env(tmp_path: Path) -> dict:
    # wandb's own folders (artifact staging, settings) inside the test's folder, not the user's home.
    folders = {
        name: str(tmp_path / "wandb-home" / name.lower())
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")
    }
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **folders}


def test_run_dir_picks_the_run_whose_checkpoint_was_written_last(tmp_path):
    runs = tmp_path / "outputs" / "demo" / "runs"
    fresh = str(runs / "2026-12-06_12-00-00")
    assert run_dir(fresh, "last") == fresh and newest_run(runs) is None  # nothing yet: a fresh folder
    for name, age in (("2026-12-01_00-00-00", 10), ("2026-12-02_00-00-00", 300), ("2026-12-03_00-00-00", None)):
        (runs / name / "checkpoints").mkdir(parents=True)
        if age is not None:
            checkpoint = runs / name / "checkpoints" / ("last.ckpt" if age == 10 else "on_exception.ckpt")
            checkpoint.write_bytes(b"")
            os.utime(checkpoint, (time.time() - age, time.time() - age))
    # The folder named last has no checkpoint; of the other two, the first run was trained (resumed) more recently.
    assert run_dir(fresh, "last") == str(runs / "2026-12-01_00-00-00")
    assert run_dir(fresh, str(runs / "2026-12-02_00-00-00")) == str(runs / "2026-12-02_00-00-00")
    assert run_dir(fresh, None) == fresh and run_dir(fresh, str(tmp_path / "a.ckpt")) == fresh


def test_ckpt_path_last_with_nothing_to_resume_stops_and_says_so(tmp_path, cache_dir, tiny_sd, tiny_llm):
    overrides = cli_overrides(tiny_overrides(tmp_path, cache_dir))
    command = [sys.executable, "-m", "sur_lightning.train", "+experiment=sur_demo", *overrides, "ckpt_path=last"]
    result = subprocess.run(
        command, check=False, cwd=ROOT, env=wandb_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    runs = tmp_path / "outputs" / "sur_demo" / "runs"
    assert f"Nothing to resume: no run of task 'sur_demo' under {runs}" in result.stdout
    assert "ckpt_path_optional=true" in result.stdout and "Traceback" not in result.stderr
    assert not list(runs.glob("*/checkpoints"))


@pytest.mark.slow
def test_a_killed_run_resumes_in_place_through_ckpt_path_last(tmp_path, cache_dir, tiny_sd, tiny_llm):
    """SIGKILL after the step-3 checkpoint, then the same command with ckpt_path=last: the newest run of the task
    continues in its own folder (an older run with a damaged checkpoint is left alone), with the same W&B run id,
    its first .hydra/ kept, and train.log telling both parts."""
    overrides = cli_overrides(tiny_overrides(tmp_path, cache_dir))
    common = [
        "+experiment=sur_demo",
        *overrides,
        "logger=wandb",
        "callbacks.sample_grid=null",
        "trainer.val_check_interval=100000",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    runs = tmp_path / "outputs" / "sur_demo" / "runs"
    older = runs / "2000-01-01_00-00-00" / "checkpoints" / "last.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"not a checkpoint")
    os.utime(older, (0, 0))

    env = wandb_env(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "sur_lightning.train", *common, "trainer.max_steps=100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(runs.glob("2*_*/checkpoints/step000003.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, "training did not reach step 3"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    run = next(runs.glob("2*_*/checkpoints/step000003.ckpt")).parent.parent
    first_id = json.loads((run / "wandb_run.json").read_text())["id"]

    import torch

    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    command = [sys.executable, "-m", "sur_lightning.train", *common, "ckpt_path=last", f"trainer.max_steps={step + 2}"]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in runs.iterdir()) == ["2000-01-01_00-00-00", run.name]  # no new folder
    assert json.loads((run / "metrics.json").read_text())["global_step"] == step + 2
    # One W&B run in two offline parts (`wandb sync` joins them): both carry the saved id.
    assert sorted(p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")) == [first_id, first_id]
    # The first job's config stays in .hydra/; the resume's is beside it.
    assert "ckpt_path=last" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path=last" in next((run / ".hydra").glob("resumed-*/overrides.yaml")).read_text()
    log = (run / "train.log").read_text()
    assert f"Resuming {run} from checkpoints/last.ckpt" in log and "Run finished at step" in log
    assert "no last checkpoint available" not in result.stdout + result.stderr


def wandb_records(path: Path):
    """The records of a ``.wandb`` transaction log, parsed with wandb's own protobuf schema. The file is a
    LevelDB-style log (wandb-core writes it; the Python SDK no longer ships a reader): a 7-byte header, then
    32 KiB blocks of chunks, each ``crc32 | length | type`` and its bytes; types 1 (full) and 4 (last) end a record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        chunk = data[position + 7 : position + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad chunk at byte {position}"
        position += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history_row(history) -> dict:
    """One ``wandb.log`` call as a nested dict: an item's ``nested_key`` is its path (``["samples", "_type"]``)."""
    row: dict = {}
    for item in history.item:
        *parents, last = list(item.nested_key) or [item.key]
        node = row
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json) if item.value_json else None
    return row


@pytest.mark.slow
def test_the_run_folder_and_the_offline_wandb_run_hold_the_report_images_and_adapter(tmp_path, cache_dir, tiny_llm):
    """+experiment=demo on the shipped toy base, 2 steps with the smoke evaluation, an adapter export at step 1:
    the run folder has train.log with the table and report.md/report.json; the offline W&B run has the per-split
    table and the sample grid at steps 1 and 2, and the adapter folder as a model artifact with trained_with."""
    overrides = cli_overrides(toy_demo_overrides(tmp_path, cache_dir))
    command = [
        sys.executable,
        "-m",
        "sur_lightning.train",
        "+experiment=demo",
        "callbacks=toyworld_smoke",
        *overrides,
        "logger=wandb",
        "callbacks.adapter_export.at_steps=[1]",
        "callbacks.evaluation.num_inference_steps=2",
    ]
    result = subprocess.run(
        command, check=False, cwd=ROOT, env=wandb_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    console = result.stdout + result.stderr
    for noise in (
        "litlogger",
        "anonymous setting",
        "Modules in eval mode",
        "module(s) in eval mode",
        "no last checkpoint",
    ):
        assert noise not in console, noise
    run = next((tmp_path / "outputs" / "demo" / "runs").iterdir())

    log = (run / "train.log").read_text()
    assert "| held_out_combinations | adapter + simple | 4 |" in log and "Run finished at step 2" in log
    assert (run / "metrics.json").exists() and "| held_out_objects | base + complex | 4 |" in (
        run / "report.md"
    ).read_text()
    assert json.loads((run / "report.json").read_text())["settings"]["step"] == 2

    offline = next((run / "wandb").glob("offline-run-*"))
    records = list(wandb_records(next(offline.glob("*.wandb"))))
    name = next(r.run.display_name for r in records if r.WhichOneof("record_type") == "run")
    assert name.startswith("demo-ella-s42-") and len(name) == len("demo-ella-s42-") + 6
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for u in r.config.update
    }
    assert "logger=wandb" in config["overrides"]

    history = [history_row(r.history) for r in records if r.WhichOneof("record_type") == "history"]
    tables = [(h["trainer/global_step"], h["eval/splits"]) for h in history if "eval/splits" in h]
    images = [(h["trainer/global_step"], h["samples"]) for h in history if "samples" in h]
    assert [step for step, _ in tables] == [1, 2] and [step for step, _ in images] == [1, 2]
    assert all(
        t["_type"] == "table-file" and i["_type"] == "images/separated" for (_, t), (_, i) in zip(tables, images)
    )
    table = json.loads((offline / "files" / tables[-1][1]["path"]).read_text())
    assert "gap_closed/color_accuracy" in table["columns"] and len(table["data"]) == 2 * 3  # 2 splits x 3 columns
    rows = {(row[0], row[1]): dict(zip(table["columns"], row)) for row in table["data"]}
    assert rows[("held_out_combinations", "adapter")]["n"] == 4
    assert rows[("held_out_combinations", "base")]["gap_closed/color_accuracy"] is None
    grids = sorted((offline / "files" / "media" / "images").glob("samples_*.png"))
    assert len(grids) == 2

    # (W&B stores each logged table as a "run_table" artifact too.)
    artifacts = [
        r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    ]
    assert len(artifacts) == 1
    artifact = artifacts[0]
    assert artifact.type == "model" and artifact.name == f"adapter-{offline.name.rsplit('-', 1)[1]}"
    metadata = json.loads(artifact.metadata)
    assert metadata["step"] == 2 and metadata["kind"] == "ella"
    assert metadata["trained_with"]["llm"]["id"].startswith("build_tiny_causal_lm(")
    assert {entry.path for entry in artifact.manifest.contents} == {"config.json", "model.safetensors"}
    assert set(artifact.aliases) >= {"latest", "step2"}
