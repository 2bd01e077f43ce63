"""One seed, one result: a run's starting weights and first losses do not depend on the feature cache's state or on
the thread count the process inherited, and two jobs can build one feature cache at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open

from sur_lightning.train import train
from sur_lightning.training.feature_cache import fill_text
from sur_lightning.training.feature_store import FeatureCache, FeatureStore
from sur_lightning.training.module import ConnectorTrainingModule

ROOT = Path(__file__).resolve().parents[2]


def step_losses(csv_dir: Path) -> dict[int, float]:
    import csv

    with open(csv_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_cold_and_warm_cache_give_the_same_initial_weights_and_losses(compose, tmp_path, monkeypatch):
    """A cold cache folder builds the tiny backbone and LLM and encodes the features before the connector is built
    (drawing from the global generator, as SmolLM2's GGUF conversion does); a warm one loads them. Same seed: the
    same starting connector and the same losses."""
    initial = []
    monkeypatch.setattr(
        ConnectorTrainingModule,
        "on_train_start",
        lambda self: initial.append({k: v.clone() for k, v in self.connector.state_dict().items()}),
        raising=False,
    )
    cache = tmp_path / "cold-cache"  # models and features: empty before the first run
    common = [
        f"paths.cache_dir={cache}",
        "data.cache=auto",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100000",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint.every_n_train_steps=100000",
    ]
    losses = []
    for run in ("cold", "warm"):
        cfg = compose("+experiment=sur_demo", *common, f"paths.output_dir={tmp_path / run}")
        train(cfg)
        losses.append(step_losses(tmp_path / run / "csv" / "version_0"))
    cold, warm = initial
    assert cold.keys() == warm.keys()
    assert all(torch.equal(cold[k], warm[k]) for k in cold), "the connector started from other weights on a warm cache"
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_the_run_chooses_its_threads_and_records_its_environment(compose, tmp_path):
    torch.set_num_threads(1)  # as an exported OMP_NUM_THREADS=1 would leave it
    try:
        cfg = compose("+experiment=sur_demo", "+trainer.fast_dev_run=true", "threads=2")
        train(cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    environment = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["environment"]
    assert environment["threads"] == 2
    assert environment["versions"]["torch"] == torch.__version__.split("+")[0]
    assert environment["cpu"] and environment["deterministic_algorithms"] is True
    assert os.environ["MKL_DYNAMIC"] == "FALSE" and os.environ["OMP_DYNAMIC"] == "FALSE"


def test_an_llm_entry_does_not_depend_on_the_prompts_encoded_with_it(tmp_path, llm):
    """The same prompt, encoded among longer ones or alone, gives the same tensor (padding cannot reach it)."""
    prompts = ["two red circles", "a pair of tomatoes lying on a wooden kitchen table in the morning light", "one"]
    together = FeatureStore(tmp_path, "together", {"p": 1}, ("states",))
    fill_text(together, prompts, llm, torch.float32, "LLM states")
    for prompt in prompts:
        alone = FeatureStore(tmp_path, "alone", {"p": prompt}, ("states",))
        fill_text(alone, [prompt], llm, torch.float32, "LLM states")
        assert torch.equal(
            FeatureCache.lookup(together, prompt)["states"], FeatureCache.lookup(alone, prompt)["states"]
        )


def shard_entries(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry written under a feature-cache folder, keyed by (kind/fingerprint, key); a key twice fails."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(folder.glob("*/*/shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            for name in names:
                key, _, field = name.rpartition("/")
                entry = entries.setdefault(f"{shard.parent.relative_to(folder)}/{key}", {})
                assert field not in entry, f"{key} written twice"
                entry[field] = f.get_tensor(name)
    return entries


@pytest.mark.slow
def test_two_jobs_on_one_empty_cache_both_train_and_each_entry_is_written_once(tmp_path, cache_dir, tiny_sd, tiny_llm):
    def command(name: str, features: Path) -> list[str]:
        output = tmp_path / name
        return [
            sys.executable,
            "-m",
            "sur_lightning.train",
            "+experiment=sur_demo",
            *tiny_overrides(tmp_path, cache_dir),
            "data.cache=auto",
            f"data.cache_dir={features}",
            "trainer.max_steps=1",
            "trainer.val_check_interval=100000",
            "callbacks.sample_grid=null",
            f"paths.output_dir={output}",
            f"hydra.run.dir={output}",
        ]

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    shared = tmp_path / "shared-features"
    jobs = [
        subprocess.Popen(
            command(f"job{i}", shared), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(2)
    ]
    logs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # One job built the entries, the other waited for the lock and found nothing missing.
    assert sum("LLM states:   0%" in log for log in logs) == 1

    alone = tmp_path / "alone-features"
    result = subprocess.run(
        command("alone", alone), check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    both, one = shard_entries(shared), shard_entries(alone)
    assert both.keys() == one.keys() and len(both) > 0
    for key in one:
        assert all(torch.equal(both[key][field], one[key][field]) for field in one[key]), key


def test_the_tiny_builders_leave_the_global_generator_alone(tmp_path):
    from sur_lightning.models.random_models import build_tiny_causal_lm

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_causal_lm(tmp_path / "llm")
    assert torch.equal(torch.rand(3), expected)
