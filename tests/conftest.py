"""Shared fixtures: tiny models built once per session, and Hydra configs composed with tiny overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def load_experiment_script(relative: str, name: str):
    """An ``experiments/`` script (not a package) imported as module ``name``: ``load_experiment_script("loss_table/run.py", ...)``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS_DIR / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the whole session: the tiny SD and tiny LLM are written there once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_sd(cache_dir) -> str:
    from sur_lightning.models.random_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(cache_dir / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl(cache_dir) -> str:
    from sur_lightning.models.random_models import build_tiny_sdxl

    return build_tiny_sdxl(cache_dir / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_llm(cache_dir) -> str:
    from sur_lightning.models.random_models import build_tiny_causal_lm

    return build_tiny_causal_lm(cache_dir / "tiny-llm")


@pytest.fixture(scope="session")
def backbone(tiny_sd):
    from sur_lightning.models.backbone import StableDiffusionBackbone

    return StableDiffusionBackbone(tiny_sd)


@pytest.fixture(scope="session")
def llm(tiny_llm):
    from sur_lightning.models.llm import CausalLMFeatures

    return CausalLMFeatures(tiny_llm)


def open_cache(cfg):
    """The feature cache of a training config, opened as the entry points open it."""
    from sur_lightning.config import feature_cache_arguments
    from sur_lightning.training.feature_store import FeatureCache

    return FeatureCache.open(**feature_cache_arguments(cfg))


def tiny_overrides(root: Path, cache: Path) -> list[str]:
    """Overrides that make any experiment run offline in seconds on the CPU."""
    return [
        "backbone=tiny",
        "llm=tiny",
        "data=synthetic",
        "trainer=cpu",
        "logger=csv",
        # The toy-world callbacks (a 64-prompt evaluation) have their own tests in test_toyworld.py.
        "callbacks=default",
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={root}/run",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.root.num_images=12",
        "data.val_size=2",
        "connector.ff_dim=32",
        "callbacks.sample_grid.num_inference_steps=2",
        "callbacks.sample_grid.prompts=[two red circles,one blue square]",
        "callbacks.sample_grid.seeds=[0,1]",
    ]


@pytest.fixture
def compose(tmp_path, cache_dir, tiny_sd, tiny_llm):
    """compose(*overrides) -> the train config; tiny overrides first, so the given ones win."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str, tiny: bool = True):
        extra = tiny_overrides(tmp_path, cache_dir) if tiny else []
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name="train", overrides=[*extra, *overrides])

    return _compose


def toy_demo_overrides(tmp_path, cache_dir) -> list[str]:
    """+experiment=demo on the shipped base and the tiny LLM, 2 steps, a 4-prompt evaluation."""
    return [
        "llm=tiny",
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path}/run",
        "data.root.images_per_combo=1",
        "data.batch_size=2",
        "data.val_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.prompts.per_split=1",
        "callbacks.sample_grid.num_inference_steps=2",
        "callbacks.evaluation.prompts.per_split=4",
        "callbacks.evaluation.seeds=[0]",
        "callbacks.evaluation.num_inference_steps=2",
    ]
