"""Generation: per-step conditioning through the UNet hook, CFG branches kept apart, η override and sweep,
ELLA + CLIP concatenation, and the `generate` command's files."""

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sur_lightning.data.prompt_suites import load_prompt_list
from sur_lightning.generate import generate
from sur_lightning.generation.conditioning import (
    ClipConditioning,
    ConnectorConditioning,
    frozen_text_features,
    override_eta,
)
from sur_lightning.generation.pipeline import build_pipeline, render, render_base_and_adapter
from sur_lightning.models.connectors import save_connector
from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
PROMPTS_A = ["two red circles", "one blue square"]
PROMPTS_B = ["five green circles", "a chef tossing pizza dough"]


def tiny_ella(seed: int = 0) -> TimestepAwareSemanticConnector:
    torch.manual_seed(seed)
    return TimestepAwareSemanticConnector(
        dim=32, llm_dim=32, num_blocks=1, num_heads=4, num_latents=8, time_channels=16, time_embed_dim=16
    ).eval()


def tiny_sur(batch_first: bool = True, eta: float = 0.5, seed: int = 0) -> SURAdapter:
    """zero_init_output=False, so the adapter's output (not only its bias) reaches the conditioning."""
    torch.manual_seed(seed)
    return SURAdapter(
        dim=32,
        llm_dim=32,
        eta=FixedEta(eta),
        num_heads=4,
        ff_dim=32,
        dropout=0.0,
        batch_first=batch_first,
        zero_init_output=False,
    ).eval()


@pytest.fixture(scope="module")
def token_llm(tiny_llm):
    from sur_lightning.models.llm import CausalLMFeatures

    return CausalLMFeatures(tiny_llm, pooling="none")


@pytest.fixture(scope="module")
def pipelines(backbone):
    return {name: build_pipeline(backbone, name) for name in ("ddim", "dpm++", "euler")}


@contextmanager
def unet_inputs(unet):
    """Record (timestep, encoder_hidden_states) of every UNet call, as the UNet received them."""
    calls = []

    def hook(module, args, kwargs, output):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((torch.as_tensor(timestep).clone(), kwargs["encoder_hidden_states"].detach().clone()))

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["ella", "sur_released"])
def test_unconditional_rows_do_not_depend_on_the_conditional_prompts(backbone, pipelines, token_llm, kind):
    # The released SUR (batch_first=False) attends over the batch axis: conditioning [uncond; cond] in one
    # call would let the empty prompt's rows see the real prompts. Each branch must get its own call.
    connector = tiny_ella() if kind == "ella" else tiny_sur(batch_first=False)
    conditioning = ConnectorConditioning(connector, frozen_text_features(backbone, token_llm))
    runs = []
    for prompts in (PROMPTS_A, PROMPTS_B):
        with unet_inputs(backbone.unet) as calls:
            render(
                pipelines["ddim"], conditioning, prompts, [0, 1], num_inference_steps=2, guidance_scale=5.0, height=32
            )
        runs.append(calls)
    assert len(runs[0]) == len(runs[1]) == 2
    empty = conditioning.features(["", ""])
    for (t, a), (_, b) in zip(*runs):
        assert a.shape[0] == 4
        assert torch.equal(a[:2], b[:2])  # the unconditional rows are the same whatever the prompts
        assert not torch.allclose(a[2:], b[2:])  # the conditional rows follow the prompts
        assert torch.allclose(a[:2], conditioning.apply(empty, t), atol=1e-6)
    if kind == "sur_released":  # the test has teeth: one joint call would have changed the empty rows
        joint = conditioning.features(["", "", *PROMPTS_A])
        mixed = connector(joint, None).conditioning[:2]
        assert not torch.allclose(mixed, runs[0][0][1][:2], atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_timestep_aware_connector_is_recomputed_at_every_step(backbone, pipelines, token_llm, scheduler):
    ella = tiny_ella()
    conditioning = ConnectorConditioning(ella, frozen_text_features(backbone, token_llm))
    pipeline = pipelines[scheduler]
    with unet_inputs(backbone.unet) as calls:
        render(pipeline, conditioning, PROMPTS_A, [0, 1], num_inference_steps=3, guidance_scale=5.0, height=32)
    assert len(calls) == 3
    assert torch.allclose(torch.stack([t.float().reshape(()) for t, _ in calls]), pipeline.scheduler.timesteps.float())
    features = conditioning.features(PROMPTS_A)
    for t, states in calls:
        expected = ella(features, t.reshape(-1).expand(2)).conditioning
        assert torch.allclose(states[2:], expected, atol=1e-5)
    assert not torch.allclose(calls[0][1], calls[1][1])  # a different timestep, a different conditioning


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_the_connector_runs_once_per_branch_per_step_and_never_for_placeholders(
    backbone, pipelines, token_llm, guidance_scale
):
    ella = tiny_ella()
    conditioning = ConnectorConditioning(ella, frozen_text_features(backbone, token_llm))
    timesteps = []
    handle = ella.register_forward_hook(lambda module, args, output: timesteps.append(args[1].reshape(-1)[0].item()))
    try:
        render(
            pipelines["ddim"],
            conditioning,
            PROMPTS_A,
            [0, 1],
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            height=32,
        )
    finally:
        handle.remove()
    branches = 2 if guidance_scale > 1 else 1
    expected = [t for t in pipelines["ddim"].scheduler.timesteps.tolist() for _ in range(branches)]
    assert timesteps == expected  # no extra calls at t = 999


def test_a_timestep_independent_connector_runs_once_per_branch_per_render(backbone, pipelines, token_llm):
    sur = tiny_sur()
    conditioning = ConnectorConditioning(sur, frozen_text_features(backbone, token_llm))
    calls = []
    handle = sur.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with unet_inputs(backbone.unet) as unet_calls:
            render(
                pipelines["ddim"], conditioning, PROMPTS_A, [0, 1], num_inference_steps=3, guidance_scale=5.0, height=32
            )
    finally:
        handle.remove()
    assert len(calls) == 2 and len(unet_calls) == 3  # prompt and negative once each, for three steps
    features = conditioning.features(PROMPTS_A)
    for _, states in unet_calls:
        assert torch.allclose(states[2:], sur(features, None).conditioning, atol=1e-6)


def test_negative_base_keeps_the_base_states_for_the_unconditional_branch(backbone, pipelines, token_llm):
    sur = tiny_sur()
    conditioning = ConnectorConditioning(sur, frozen_text_features(backbone, token_llm), negative="base")
    with unet_inputs(backbone.unet) as calls:
        render(pipelines["ddim"], conditioning, PROMPTS_A, [0, 1], num_inference_steps=2, guidance_scale=5.0, height=32)
    empty, features = conditioning.features(["", ""]), conditioning.features(PROMPTS_A)
    for _, states in calls:
        assert torch.allclose(states[:2], empty.clip, atol=1e-6)  # CLIP(""), not the adapter's output for it
        assert torch.allclose(states[2:], sur(features, None).conditioning, atol=1e-6)
    ella = ConnectorConditioning(tiny_ella(), frozen_text_features(backbone, token_llm), negative="base")
    with pytest.raises(ValueError, match="negative=base needs a connector with CLIP's token count"):
        render(pipelines["ddim"], ella, PROMPTS_A, [0, 1], num_inference_steps=1, guidance_scale=5.0, height=32)


def test_concat_clip_mode_puts_clip_first_then_the_connector_tokens(backbone, pipelines, token_llm):
    ella = tiny_ella()
    text_features = frozen_text_features(backbone, token_llm)
    both = ConnectorConditioning(ella, text_features, mode="concat_clip")
    t = torch.tensor(500)
    out = both(PROMPTS_A, t)
    assert out.shape == (2, 77 + 8, 32)
    assert torch.equal(out[:, :77], backbone.encode_prompt(PROMPTS_A))
    assert torch.allclose(out[:, 77:], ConnectorConditioning(ella, text_features)(PROMPTS_A, t))
    with unet_inputs(backbone.unet) as calls:
        images = render(pipelines["ddim"], both, PROMPTS_A, [0, 1], num_inference_steps=2, height=32)
    assert len(images) == 2 and calls[0][1].shape == (4, 85, 32)
    with pytest.raises(ValueError, match="mode"):
        ConnectorConditioning(ella, text_features, mode="ella_only")


def test_eta_override_is_scoped_and_eta_zero_gives_the_base_image(backbone, pipelines):
    sur = tiny_sur(eta=0.5)
    text_features = frozen_text_features(backbone)
    original = sur.eta
    clip = ClipConditioning(text_features)
    assert torch.equal(ConnectorConditioning(sur, text_features, eta=0.0)(PROMPTS_A, 0), clip(PROMPTS_A, 0))
    assert sur.eta is original
    half = ConnectorConditioning(sur, text_features)(PROMPTS_A, 0)
    assert not torch.allclose(half, clip(PROMPTS_A, 0))
    with override_eta(sur, 1.0):
        assert sur.eta.value == 1.0
    assert sur.eta is original
    base = render(pipelines["ddim"], clip, PROMPTS_A, [0, 1], num_inference_steps=2, height=32)
    zero_eta = ConnectorConditioning(sur, text_features, eta=0.0)
    zero = render(pipelines["ddim"], zero_eta, PROMPTS_A, [0, 1], num_inference_steps=2, height=32)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, zero))
    with pytest.raises(TypeError, match="η"), override_eta(tiny_ella(), 0.3):
        pass


def test_sample_grid_path_renders_base_and_adapter(backbone):
    sur = tiny_sur().train()
    module = SimpleNamespace(backbone=backbone, connector=sur, text_features=frozen_text_features(backbone))
    base, adapted = render_base_and_adapter(module, PROMPTS_A, [0, 1], num_inference_steps=2, height=32)
    assert len(base) == len(adapted) == 2 and sur.training  # train mode restored
    assert not np.array_equal(np.asarray(base[0]), np.asarray(adapted[0]))


def test_prompt_lists_from_strings_suites_and_dataset_folders(tmp_path):
    assert [p.prompt for p in load_prompt_list(["a", "b"])] == ["a", "b"]
    counting = load_prompt_list("counting", num_prompts=3)
    assert len(counting) == 3 and counting[0].category == "counting"
    folder = tmp_path / "set" / "train"
    folder.mkdir(parents=True)
    rows = [
        {"file_name": "000001.png", "text": "two red circles", "prompt": "long"},
        {"file_name": "x.png", "text": "one blue square"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prompts = load_prompt_list(str(folder))
    assert [(p.id, p.prompt) for p in prompts] == [("000001", "two red circles"), ("x", "one blue square")]


# ------------------------------------------------------------------------------------ the command


def compose_generate(tmp_path, cache_dir, *overrides, name="generate"):
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path}/run",
        "backbone=tiny",
        "llm=tiny",
        "sampler.num_inference_steps=2",
        "sampler.resolution=32",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[*base, *overrides])


def test_generate_writes_images_grid_eta_strips_and_manifest(tmp_path, cache_dir, tiny_sd, tiny_llm):
    adapter, _ = save_connector(tiny_sur(), tmp_path / "runA" / "adapter.safetensors")
    cfg = compose_generate(
        tmp_path,
        cache_dir,
        f"adapters=[{adapter}]",
        "eta_sweep=[0.0,1.0]",
        "seeds=[0,1]",
        "prompts=[two red circles,one blue square]",
    )
    written = generate(cfg)
    run = Path(cfg.paths.output_dir)
    folders = sorted(p.name for p in (run / "images").iterdir())
    assert folders == ["base", "sur_eta0", "sur_eta1"]  # named by its connector (no run config beside it)
    for folder in folders:
        assert sorted(p.name for p in (run / "images" / folder).iterdir()) == [
            "prompt-000_seed0.png",
            "prompt-000_seed1.png",
            "prompt-001_seed0.png",
            "prompt-001_seed1.png",
        ]
    assert Image.open(run / "grid.png").size == (160 + 3 * 128, 16 + 4 * 128)
    assert len(written["strips"]) == 4 and all(Path(p).exists() for p in written["strips"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["images"]) == 12
    row = next(r for r in manifest["images"] if r["column"] == "sur eta=1")
    assert row["adapter"] == str(adapter) and row["eta"] == 1.0 and row["seed"] in (0, 1) and row["prompt"]
    # Same seeds everywhere: η = 0 reproduces the base model's images exactly.
    for name in ("prompt-000_seed0.png", "prompt-001_seed1.png"):
        assert np.array_equal(
            np.asarray(Image.open(run / "images/base" / name)), np.asarray(Image.open(run / "images/sur_eta0" / name))
        )


def test_generate_with_an_ella_adapter_reads_token_states(tmp_path, cache_dir, tiny_sd, tiny_llm):
    adapter, _ = save_connector(tiny_ella(), tmp_path / "ella.safetensors")
    cfg = compose_generate(
        tmp_path,
        cache_dir,
        f"adapters={{ella:{{path:{adapter},mode:concat_clip}}}}",
        "llm.pooling=none",
        "include_base=false",
        "prompts=[two red circles]",
    )
    generate(cfg)
    manifest = json.loads((Path(cfg.paths.output_dir) / "manifest.json").read_text())
    assert [(r["column"], r["mode"], r["kind"]) for r in manifest["images"]] == [
        ("ella", "concat_clip", "TimestepAwareSemanticConnector")
    ]
    # Without llm.pooling=none: generation loads the LLM only for connectors that read token states, and asks for them.
    default = compose_generate(
        tmp_path,
        cache_dir,
        f"adapters=[{adapter}]",
        "prompts=[two red circles]",
        f"paths.output_dir={tmp_path}/default",
    )
    assert default.llm.pooling == "mean"
    generate(default)
    assert (tmp_path / "default" / "images" / "ella").is_dir()


def test_generate_without_an_adapter_warns_that_a_random_test_backbone_draws_noise(
    tmp_path, cache_dir, tiny_sd, capsys
):
    """`python -m sur_lightning.generate 'prompts=[two red circles]'`: the default backbone is the random tiny one."""
    from sur_lightning.generation.columns import random_backbone_warning

    cfg = compose_generate(tmp_path, cache_dir, "prompts=[two red circles]")
    generate(cfg)
    err = capsys.readouterr().err
    assert f"Warning: the backbone {tiny_sd} is a random test model" in err
    assert "images will be noise" in err and "backbone=toy" in err and "backbone=sd15" in err
    # An adapter, or a folder no random-weight builder wrote (the toy base, a trained model): no warning.
    assert random_backbone_warning(SimpleNamespace(pretrained=tiny_sd), ["adapter.safetensors"]) is None
    assert random_backbone_warning(SimpleNamespace(pretrained=str(tmp_path)), None) is None
    assert (
        random_backbone_warning(SimpleNamespace(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5"), None) is None
    )
