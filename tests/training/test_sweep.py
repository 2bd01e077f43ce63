"""Sweeps that compare connectors: LLM pooling follows the connector, incompatible pairs are named before the
first job starts, W&B runs are named and grouped per sweep, and sweep_report turns a multirun into a table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from hydra.utils import instantiate

from sur_lightning.config import IncompatibleConfigError, check_combination
from sur_lightning.sweep_report import sweep_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("connector, pooling", [("sur", "mean"), ("ella", "none"), ("ella_small", "none")])
def test_llm_pooling_follows_the_connector(compose, connector, pooling):
    cfg = compose("+experiment=sur_demo", f"connector={connector}", "loss=denoising", tiny=False)
    assert cfg.llm.pooling == pooling
    check_combination(cfg, {})


def test_presets_are_connector_neutral(compose):
    # connector=ella under the SUR demo: builds at the toy base's width, no SUR-only keys leak in.
    cfg = compose("+experiment=sur_demo", "connector=ella", "loss=denoising", tiny=False)
    tsc = instantiate(cfg.connector)(dim=128, llm_dim=576)
    assert type(tsc).__name__ == "TimestepAwareSemanticConnector" and len(tsc.blocks) == 6
    small = compose("+experiment=ella_demo", tiny=False)
    assert small.connector.num_blocks == 2 and small.llm.pooling == "none"


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["connector=ella", "loss=kl"], ["connector=ella", "loss=kl", "loss=denoising"]),
        (
            ["connector=ella", "loss=denoising", "llm.pooling=mean"],
            ["connector=ella", "llm=smollm2", "llm.pooling=none"],
        ),
        (["connector=sur", "llm=t5_tiny"], ["connector=sur", "llm=t5_tiny"]),
        (
            ["loss=denoising", "+loss/teacher=unet", "model.caption_dropout=0.1"],
            ["model.caption_dropout=0.1", "loss/teacher=unet"],
        ),
    ],
)
def test_incompatible_pairs_are_named(compose, overrides, names):
    cfg = compose("+experiment=sur_demo", *overrides, tiny=False)
    choices = {
        "connector": cfg.connector._target_.endswith("SURAdapter") and "sur" or "ella",
        "llm": next((o.split("=")[1] for o in overrides if o.startswith("llm=")), "smollm2"),
        "loss": next((o.split("=")[1] for o in overrides if o.startswith("loss=")), "cosine"),
    }
    with pytest.raises(IncompatibleConfigError) as info:
        check_combination(cfg, choices)
    for name in names:
        assert name in str(info.value)


def test_keys_of_another_connector_are_named(compose):
    cfg = compose("+experiment=sur_released", "connector=ella", "loss=denoising", "llm=smollm2_tokens", tiny=False)
    with pytest.raises(IncompatibleConfigError, match="does not take batch_first, train_llm_projection"):
        check_combination(cfg, {"connector": "ella"})


def multirun(tmp_path, cache_dir, *sweep: str) -> subprocess.CompletedProcess:
    # connector.ff_dim is SUR's: the tiny overrides without it serve both connectors.
    overrides = [o for o in tiny_overrides(tmp_path, cache_dir) if not o.startswith(("paths.output_dir", "connector."))]
    command = [
        sys.executable,
        "-m",
        "sur_lightning.train",
        "-m",
        "+experiment=sur_demo",
        "+trainer.fast_dev_run=true",
        *overrides,
        *sweep,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_an_incompatible_sweep_stops_before_its_first_job(tmp_path, cache_dir, tiny_sd, tiny_llm):
    result = multirun(tmp_path, cache_dir, "connector=sur,ella", "loss=cosine,denoising")
    assert result.returncode != 0
    assert "1 of 4 jobs of this sweep cannot train; none was started" in result.stderr
    assert "connector=ella and loss=cosine are incompatible" in result.stderr
    assert not list((tmp_path / "sweep").glob("*/metrics.json"))


def test_a_connector_sweep_runs_every_job_names_wandb_runs_and_reports(tmp_path, cache_dir, tiny_sd, tiny_llm):
    result = multirun(tmp_path, cache_dir, "connector=sur,ella", "loss=denoising", "logger=wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep pre-flight: all 2 jobs are compatible" in result.stdout
    sweep = tmp_path / "sweep"
    group = f"sur_demo-{sweep.name}"
    import re

    names = []
    for connector in ("sur", "ella"):
        # The name: the task, the connector, the seed and a short hash of the job's overrides (which are in the config).
        pattern = rf"run '(sur_demo-{connector}-s42-[0-9a-f]{{6}})', group '{group}', job_type '{connector}'"
        names += re.findall(pattern, result.stdout)
    assert len(names) == 2 and len(set(names)) == 2, result.stdout[-3000:]
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2

    report = sweep_report(sweep)
    assert report["swept"] == ["connector"]
    assert [(r["connector"], r["status"], r["step"]) for r in report["rows"]] == [
        ("sur", "finished", 1),
        ("ella", "finished", 1),
    ]
    assert "train/loss" in report["columns"] and report["plot"].exists()
    assert "| 1 | ella | finished | 1 |" in report["markdown"].read_text()


def test_sweep_report_lists_unfinished_jobs_and_names_unknown_metrics(tmp_path):
    for job, (connector, metrics) in enumerate([("sur", {"global_step": 5, "val/denoising": 0.5}), ("ella", None)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"connector={connector}", "seed=1"]))
        if metrics:
            (folder / "metrics.json").write_text(__import__("json").dumps(metrics))
    report = sweep_report(tmp_path)
    assert report["swept"] == ["connector"]
    assert [r["status"] for r in report["rows"]] == ["finished", "unfinished (no metrics.json)"]
    assert report["rows"][0]["val/denoising"] == 0.5
    with pytest.raises(KeyError, match="eval/x.*val/denoising"):
        sweep_report(tmp_path, metrics=["eval/x"])
    with pytest.raises(FileNotFoundError, match="no Hydra job folders"):
        sweep_report(tmp_path / "0" / ".hydra")


def test_the_slurm_launcher_composes_with_one_task_per_gpu(tmp_path):
    from hydra import compose, initialize_config_dir

    from sur_lightning.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "trainer=ddp",
                "ckpt_path=last",
            ],
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert launcher.max_num_timeout == 3 and launcher.additional_parameters.requeue is True
    assert cfg.trainer.strategy == "ddp" and cfg.ckpt_path == "last"


def test_caption_dropout_with_alignment_passes_the_check(compose):
    # A dropped caption is aligned to CLIP("") (issue 19 §4); only the UNet teacher is still refused with it.
    check_combination(compose("+experiment=sur_demo", "model.caption_dropout=0.1", tiny=False))
