"""Files written before the layout move (issue 20) still load: tests/fixtures/pre_layout/README.md says how
they were written. Their configs name the old module paths (``sur_lightning.connectors.sur.SURAdapter``)."""

import json
from pathlib import Path

import pytest
import torch

from sur_lightning.models.connectors import TextFeatures, connector_config, current_targets, load_connector
from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import AdaptiveEta
from sur_lightning.train import train

FIXTURES = Path(__file__).parents[1] / "fixtures" / "pre_layout"


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 3, 8, generator=g)


def test_old_targets_map_to_the_new_modules():
    config = connector_config(FIXTURES / "sur_adapter.safetensors")
    assert config["_target_"] == "sur_lightning.connectors.sur.SURAdapter"
    assert config["eta"]["_target_"] == "sur_lightning.eta.AdaptiveEta"
    mapped = current_targets(config)
    assert mapped["_target_"] == "sur_lightning.models.connectors.sur.SURAdapter"
    assert mapped["eta"]["_target_"] == "sur_lightning.models.eta.AdaptiveEta"


def test_moved_builders_map_to_the_random_models_module_and_back():
    """Issue 33 moved the tiny and random models' builders into models/random_models.py: records naming them where
    they were (before or after issue 20's move) build them again, and fingerprints still name them as before."""
    from hydra.utils import get_method

    from sur_lightning.models.connectors import MOVED_BUILDERS, pre_layout_targets

    old = {
        "_target_": "sur_lightning.models.backbone.StableDiffusionBackbone",
        "pretrained": {"_target_": "sur_lightning.backbone.build_tiny_stable_diffusion", "root": "x"},
    }
    now = current_targets(old)
    assert now["pretrained"]["_target_"] == "sur_lightning.models.random_models.build_tiny_stable_diffusion"
    assert pre_layout_targets(now) == {**old, "_target_": "sur_lightning.backbone.StableDiffusionBackbone"}
    for before, after in MOVED_BUILDERS.items():
        assert current_targets({"_target_": before}) == {"_target_": after}
        assert callable(get_method(after)) and hasattr(get_method(after), "__wrapped__")  # keeps_global_rng


def test_pre_layout_adapters_load_and_give_the_outputs_they_gave_before():
    clip, pooled, tokens = inputs()
    sur = load_connector(FIXTURES / "sur_adapter.safetensors")
    assert isinstance(sur, SURAdapter) and isinstance(sur.eta, AdaptiveEta)
    ella = load_connector(FIXTURES / "ella_adapter.safetensors")
    assert isinstance(ella, TimestepAwareSemanticConnector)
    with torch.no_grad():
        sur_sum = sur(TextFeatures(clip=clip, llm=pooled)).conditioning.double().sum().item()
        ella_sum = ella(TextFeatures(clip=clip, llm=tokens), torch.tensor([10, 500])).conditioning.double().sum().item()
    # Recorded with the code before the move (README.md there).
    assert abs(sur_sum - 1.5183986760675907) < 1e-5
    assert abs(ella_sum - -6.245070368051529) < 1e-5


def test_the_header_alone_loads_too(tmp_path):
    # Without the .json beside it, the config comes from the safetensors header (old paths there too).
    copy = tmp_path / "sur_adapter.safetensors"
    copy.write_bytes((FIXTURES / "sur_adapter.safetensors").read_bytes())
    assert isinstance(load_connector(copy), SURAdapter)


@pytest.mark.slow
def test_a_pre_layout_checkpoint_resumes(compose):
    cfg = compose(
        "+experiment=sur_demo",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"ckpt_path={FIXTURES / 'sur_demo_tiny_step1.ckpt'}",
    )
    train(cfg)
    output = Path(cfg.paths.output_dir)
    assert json.loads((output / "metrics.json").read_text())["global_step"] == 2
    # The adapter it exports is written with today's module paths.
    assert (
        load_connector(output / "adapter.safetensors").config["_target_"]
        == "sur_lightning.models.connectors.sur.SURAdapter"
    )
