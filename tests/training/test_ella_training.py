"""ELLA trained through the real module and entry point: T5 features, config, gradients, timesteps, caption dropout."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR, tiny_overrides
from hydra.utils import instantiate

from sur_lightning.models.backbone import ModelNotAvailableError
from sur_lightning.models.connectors import TextFeatures, load_connector, save_connector
from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector
from sur_lightning.models.llm import T5EncoderFeatures
from sur_lightning.models.random_models import build_tiny_t5_encoder

PROMPTS = ["five dogs", "", "a chef tossing pizza dough in a busy kitchen"]


@pytest.fixture(scope="session")
def tiny_t5(cache_dir) -> str:
    return build_tiny_t5_encoder(cache_dir / "tiny-t5")


def compose_in(root: Path, cache_dir: Path, *overrides: str):
    """The train config with the shared tiny overrides (minus SUR's connector sizes), then ``overrides``."""
    from hydra import compose, initialize_config_dir

    tiny = [o for o in tiny_overrides(root, cache_dir) if not o.startswith("connector.")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*tiny, *overrides])


def build(root, cache_dir, *overrides):
    cfg = compose_in(root, cache_dir, "+experiment=ella_demo", *overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.log = lambda *a, **k: None
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return cfg, model, next(iter(datamodule.train_dataloader()))


@pytest.fixture(scope="module")
def ella_t5(tmp_path_factory, cache_dir, tiny_sd, tiny_t5):
    """(cfg, module, batch): +experiment=ella_demo on the tiny SD and the tiny T5, built once for this file."""
    return build(tmp_path_factory.mktemp("ella-t5"), cache_dir, "llm=t5_tiny")


@pytest.fixture
def compose_ella(tmp_path, cache_dir, tiny_sd, tiny_llm, tiny_t5):
    return lambda *overrides: compose_in(tmp_path, cache_dir, *overrides)


# ---------------------------------------------------------------------------------------- T5 features


def test_t5_features_give_token_states_and_mask(tiny_t5):
    t5 = T5EncoderFeatures(tiny_t5, max_length=16, dtype="float32")
    assert t5.hidden_size == 32 and not any(p.requires_grad for p in t5.parameters())
    states, mask = t5(PROMPTS)
    lengths = [len(t5.tokenizer(p).input_ids) for p in PROMPTS]
    assert states.shape == (3, 16, 32) and states.dtype == torch.float32  # padded to max_length, as the authors
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert all(mask[b, :n].all() and not mask[b, n:].any() for b, n in enumerate(lengths))

    # Padding to the longest prompt instead changes nothing on the real tokens: T5 masks the pads.
    short, short_mask = T5EncoderFeatures(tiny_t5, max_length=16, padding="longest", dtype="float32")(PROMPTS)
    assert short.shape == (3, max(lengths), 32) and torch.equal(short_mask, mask[:, : max(lengths)])
    for b, n in enumerate(lengths):
        torch.testing.assert_close(short[b, :n], states[b, :n])
    # Truncation at max_length.
    long_states, long_mask = T5EncoderFeatures(tiny_t5, max_length=4, dtype="float32")(PROMPTS)
    assert long_states.shape == (3, 4, 32) and long_mask[2].all()


def test_t5_missing_model_names_the_id_and_the_key(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="llm.pretrained=") as info:
        T5EncoderFeatures(str(tmp_path / "no-such-t5"))
    assert "no-such-t5" in str(info.value)


# ---------------------------------------------------------------------------------------- config and module


def test_connector_config_is_official_and_built_by_the_module(compose_ella, ella_t5, tmp_path):
    cfg = compose_ella("connector=ella", "llm=flan_t5_xl")
    with torch.device("meta"):  # conf/connector/ella.yaml at SD1.5's width and flan-t5-xl's: the official TSC
        official = instantiate(cfg.connector)(dim=768, llm_dim=2048)
    assert sum(p.numel() for p in official.parameters()) == 66_820_608
    assert cfg.llm.pretrained == "google/flan-t5-xl" and cfg.llm.max_length == 128 and cfg.llm.dtype == "float16"

    _, model, _ = ella_t5
    connector = model.connector
    assert isinstance(connector, TimestepAwareSemanticConnector)
    assert connector.config["dim"] == model.backbone.cross_attention_dim == 32
    assert connector.config["llm_dim"] == model.llm.hidden_size == 32
    path, _ = save_connector(connector, tmp_path / "ella.safetensors")
    reloaded = load_connector(path)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in connector.state_dict().items())


def test_pooled_llm_features_are_refused_with_a_hint(ella_t5):
    _, model, _ = ella_t5
    pooled = TextFeatures(llm=torch.randn(2, model.llm.hidden_size))  # what llm.pooling=mean gives
    with pytest.raises(ValueError, match="llm.pooling=none"):
        model.connector(pooled, torch.tensor([1, 2]))


def assert_denoising_gradient_reaches_every_tsc_parameter_and_nothing_frozen(model, batch):
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"connector.{name}" for name, _ in model.connector.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.caption_dropout = 0.0
    model.training_step(batch, 0).backward()
    for name, p in model.connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # zero-initialised AdaLN linears included
    frozen = [name for name, p in model.named_parameters() if not name.startswith("connector.")]
    assert any(n.startswith("backbone.unet.") for n in frozen) and any(n.startswith("llm.") for n in frozen)
    assert all(model.get_parameter(name).grad is None for name in frozen)
    model.zero_grad(set_to_none=True)


def test_denoising_gradient_reaches_every_tsc_parameter_and_nothing_frozen_t5(ella_t5):
    _, model, batch = ella_t5
    assert_denoising_gradient_reaches_every_tsc_parameter_and_nothing_frozen(model, batch)


def test_denoising_gradient_reaches_every_tsc_parameter_and_nothing_frozen_decoder_llm(
    compose_ella, tmp_path, cache_dir
):
    _, model, batch = build(tmp_path, cache_dir, "llm=tiny", "llm.pooling=none")
    assert model.llm.pooling == "none"
    assert_denoising_gradient_reaches_every_tsc_parameter_and_nothing_frozen(model, batch)


def test_unet_denoises_with_the_tsc_of_its_own_timestep(ella_t5):
    _, model, batch = ella_t5
    seen = {}

    def on_connector(module, args, kwargs, output):
        seen["connector_t"], seen["conditioning"] = args[1].clone(), output.conditioning.detach().clone()

    def on_unet(module, args, kwargs):
        seen["unet_t"] = (kwargs["timestep"] if "timestep" in kwargs else args[1]).clone()
        seen["unet_c"] = kwargs["encoder_hidden_states"].detach().clone()

    hooks = [
        model.connector.register_forward_hook(on_connector, with_kwargs=True),
        model.backbone.unet.register_forward_pre_hook(on_unet, with_kwargs=True),
    ]
    torch.manual_seed(3)
    model.training_step(batch, 0)
    for hook in hooks:
        hook.remove()
    size = batch["pixel_values"].shape[0]
    assert seen["connector_t"].shape == (size,) and seen["connector_t"].unique().numel() > 1
    assert torch.equal(seen["connector_t"], seen["unet_t"])
    assert seen["unet_c"].shape == (size, 64, 32)  # 64 latents at the tiny UNet's width 32
    torch.testing.assert_close(seen["unet_c"], seen["conditioning"])


# ---------------------------------------------------------------------------------------- caption dropout


def test_caption_dropout_replaces_prompts_at_the_configured_rate(ella_t5):
    cfg, model, batch = ella_t5
    assert cfg.model.caption_dropout == 0.1  # ELLA's default; SUR's experiments keep 0
    model.caption_dropout = 0.1
    prompts = [f"prompt {i}" for i in range(4000)]

    from sur_lightning.training.module import blank, sample_generators

    def drop_captions(prompts, generators):
        return blank(prompts, model.dropped_captions(generators))

    ids = [str(i) for i in range(len(prompts))]
    torch.manual_seed(7)
    first = drop_captions(prompts, sample_generators(0, 0, 5, ids))
    torch.manual_seed(8)  # the global RNG plays no part: the same keys drop the same rows
    assert drop_captions(prompts, sample_generators(0, 0, 5, ids)) == first
    assert drop_captions(prompts, sample_generators(0, 0, 6, ids)) != first  # another step, other rows
    dropped = {i for i, p in enumerate(first) if p == ""}
    assert abs(len(dropped) / len(prompts) - 0.1) < 0.015
    assert all(first[i] == prompts[i] for i in range(len(prompts)) if i not in dropped)

    model.caption_dropout = 0.0
    assert drop_captions(prompts, sample_generators(0, 0, 5, ids)) == prompts

    # Through the training step: at rate 1 the text encoders see only empty prompts.
    model.caption_dropout = 1.0
    seen = []
    hook = model.llm.register_forward_pre_hook(lambda module, args: seen.extend(args[0]))
    try:
        model.training_step(batch, 0)
    finally:
        hook.remove()
        model.caption_dropout = 0.1
    assert seen == [""] * len(batch["simple_prompt"])


# ---------------------------------------------------------------------------------------- entry point


def test_ella_demo_trains_fast_dev_run_through_the_entry_point(compose_ella):
    from sur_lightning.train import train

    # ella_demo with the tiny LLM's token states in place of SmolLM2's (the same CausalLMFeatures path).
    cfg = compose_ella(
        "+experiment=ella_demo",
        "llm=tiny",
        "llm.pooling=none",
        "+trainer.fast_dev_run=true",
        "model.lr_scheduler.num_warmup_steps=0",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/denoising" in metrics
    output = Path(cfg.paths.output_dir)
    assert json.loads((output / "metrics.json").read_text())["global_step"] == 1
    adapter = load_connector(output / "adapter.safetensors")
    assert isinstance(adapter, TimestepAwareSemanticConnector) and adapter.config["dim"] == 32
    # The file's header holds the folder's record, resolved: the file alone builds the LLM (attach, generate).
    assert adapter.trained_with == load_connector(output / "adapter").trained_with
    assert adapter.trained_with["llm"]["config"]["pooling"] == "none" and "${" not in json.dumps(adapter.trained_with)
    # The AdaLN modulations start at zero: one AdamW step on the denoising loss has moved them.
    assert all(block.ln_1.linear.weight.abs().max() > 0 for block in adapter.blocks)
    assert list((output / "samples").glob("*.png"))
