"""SUR-adapter, η and the adapter export, on tiny widths."""

import pickle

import pytest
import torch

from sur_lightning.models.connectors import TextFeatures, load_connector, save_connector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import AdaptiveEta, FixedEta, LearnableEta

DIM, LLM_DIM = 16, 24


def adapter(eta=None, **kwargs) -> SURAdapter:
    torch.manual_seed(0)
    return SURAdapter(dim=DIM, llm_dim=LLM_DIM, eta=eta or FixedEta(0.1), num_heads=4, ff_dim=32, **kwargs)


def features(batch=3, tokens=5, seed=1) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    return TextFeatures(clip=torch.randn(batch, tokens, DIM, generator=g), llm=torch.randn(batch, LLM_DIM, generator=g))


def perturb_first_sample(f: TextFeatures) -> TextFeatures:
    clip = f.clip.clone()
    clip[0] = clip[0] + 1.0
    return TextFeatures(clip=clip, llm=f.llm)


def nonzero_output_layer(model: SURAdapter) -> SURAdapter:
    # fc starts at zero, which would hide what the encoder does; give it weights.
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    return model.eval()


def test_shapes_and_internals():
    out = adapter()(features(), torch.zeros(3))
    assert out.conditioning.shape == (3, 5, DIM)
    assert out.eta.shape == (3,)
    assert out.internals["encoder"].shape == (3, 5, DIM)
    assert out.internals["llm_projected"].shape == (3, DIM)


def test_zero_initialised_output_layer_gives_one_minus_eta_times_clip_plus_bias():
    model = adapter().eval()
    f = features()
    out = model(f)
    expected = 0.1 * model.fc.bias + 0.9 * f.clip
    assert torch.allclose(out.conditioning, expected, atol=1e-6)


def test_batch_first_keeps_samples_independent():
    model = nonzero_output_layer(adapter(batch_first=True))
    f = features()
    before, after = model(f).conditioning, model(perturb_first_sample(f)).conditioning
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(before[1:], after[1:], atol=1e-6)


def test_released_switch_attends_over_the_batch_axis():
    model = nonzero_output_layer(adapter(batch_first=False))
    f = features()
    before, after = model(f).conditioning, model(perturb_first_sample(f)).conditioning
    assert not torch.allclose(before[1:], after[1:], atol=1e-4)


def test_frozen_w0_switch():
    assert adapter(train_llm_projection=True).llm_projection.weight.requires_grad
    assert not adapter(train_llm_projection=False).llm_projection.weight.requires_grad


def test_fixed_eta_has_no_parameters_and_stays_fixed():
    eta = FixedEta(0.3)
    assert list(eta.parameters()) == []
    assert torch.equal(eta(torch.randn(4, DIM)), torch.full((4,), 0.3))


@pytest.mark.parametrize("eta_cls", [LearnableEta, AdaptiveEta])
def test_learnable_and_adaptive_eta_receive_gradients_through_the_adapter(eta_cls):
    eta = eta_cls(init=0.2)
    model = adapter(eta=eta)
    torch.nn.init.normal_(model.fc.weight, std=0.1)
    out = model(features())
    assert out.eta.mean().item() == pytest.approx(0.2, abs=0.02)
    out.conditioning.square().mean().backward()
    grads = [p.grad for p in eta.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adaptive_eta_differs_across_prompts_and_stays_in_unit_interval():
    eta = AdaptiveEta(dim=DIM, init=0.5)
    values = eta(torch.randn(6, DIM) * 3)
    assert values.shape == (6,)
    assert ((values > 0) & (values < 1)).all()
    assert values.std() > 0


def test_export_reloads_and_reproduces_conditioning(tmp_path):
    model = nonzero_output_layer(adapter(eta=AdaptiveEta(init=0.3)))
    f = features()
    path, config_path = save_connector(model, tmp_path / "adapter.safetensors")
    assert config_path.exists()
    reloaded = load_connector(path)
    assert isinstance(reloaded.eta, AdaptiveEta)
    assert torch.equal(model(f).conditioning, reloaded(f).conditioning)
    # The config also lives in the safetensors header, so the file alone suffices.
    config_path.unlink()
    assert torch.equal(model(f).conditioning, load_connector(path)(f).conditioning)


def test_load_connector_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_connector(tmp_path / "nothing.safetensors")


# ----------------------------------------------------------------------------- the authors' checkpoint


def official_state_dict(adapter: SURAdapter) -> dict[str, torch.Tensor]:
    """``adapter``'s weights under the names of the released ``adapter_checkpoint*.pt``, with its unused tensors."""
    from sur_lightning.models.connectors.sur import OFFICIAL_KEY_PREFIXES

    ours_to_official = [(ours, official) for official, ours in OFFICIAL_KEY_PREFIXES]
    state = {}
    for key, value in adapter.state_dict().items():
        if key.startswith("llm_projection."):
            continue  # W0 is not in the released file
        ours, official = next(p for p in ours_to_official if key.startswith(p[0]))
        state[official + key[len(ours) :]] = value.clone()
    dim = adapter.dim
    state["encoder_layer.linear1.weight"] = torch.randn(adapter.encoder.layers[0].linear1.weight.shape)
    state["attention.value_layer.weight"] = torch.randn(dim, dim)
    state["attention.value_layer.bias"] = torch.randn(dim)
    return state


def released(dim=16, num_heads=4, **kwargs) -> SURAdapter:
    torch.manual_seed(1)
    adapter = SURAdapter(
        dim=dim,
        llm_dim=24,
        eta=FixedEta(0.1),
        num_heads=num_heads,
        ff_dim=32,
        batch_first=False,
        zero_init_output=False,
        train_llm_projection=False,
        **kwargs,
    )
    return adapter.eval()


def test_official_checkpoint_loads_under_the_released_names_and_reproduces_the_output():
    from sur_lightning.models.connectors.sur import load_official_state_dict

    source = released()
    torch.manual_seed(2)
    target = SURAdapter(dim=16, llm_dim=24, eta=FixedEta(0.1), num_heads=4, ff_dim=32, batch_first=False).eval()
    features = TextFeatures(clip=torch.randn(2, 7, 16))
    assert not torch.allclose(target(features).conditioning, source(features).conditioning)
    load_official_state_dict(target, official_state_dict(source))
    torch.testing.assert_close(target(features).conditioning, source(features).conditioning, rtol=0, atol=0)


def test_official_checkpoint_is_strict_about_unknown_missing_and_mis_shaped_keys():
    from sur_lightning.models.connectors.sur import load_official_state_dict

    state = official_state_dict(released())
    with pytest.raises(KeyError, match="unknown keys.*attention.gate"):
        load_official_state_dict(released(), {**state, "attention.gate.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing.*fc.bias"):
        load_official_state_dict(released(), {k: v for k, v in state.items() if k != "fc.bias"})
    adaptive = SURAdapter(dim=16, llm_dim=24, eta=AdaptiveEta(), num_heads=4, ff_dim=32)
    with pytest.raises(KeyError, match="eta=fixed"):
        load_official_state_dict(adaptive, state)
    with pytest.raises(ValueError, match="shapes differ.*fc.weight"):
        load_official_state_dict(released(), {**state, "fc.weight": torch.zeros(16, 8)})


def test_official_file_builds_the_released_module_with_weights_only_load(tmp_path, capsys):
    from sur_lightning.generation.columns import load_adapter

    source = released(num_heads=8, num_layers=3)  # the file does not store the head count: 8 as released
    path = tmp_path / "adapter_checkpoint5000.pt"
    torch.save(official_state_dict(source), path)
    adapter = load_adapter(path, "official")
    assert "skipped 3 unused official tensors" in capsys.readouterr().out
    assert adapter.batch_first is False and len(adapter.encoder.layers) == 3 and adapter.config["ff_dim"] == 32
    assert isinstance(adapter.eta, FixedEta) and adapter.eta.value == 0.1
    features = TextFeatures(clip=torch.randn(2, 7, 16))
    torch.testing.assert_close(adapter(features).conditioning, source(features).conditioning, rtol=0, atol=0)
    # weights_only=True: a pickle that would run code is refused.
    torch.save({"fc.weight": torch.zeros(1), "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_adapter(tmp_path / "evil.pt", "official")
    with pytest.raises(ValueError, match="format must be one of"):
        load_adapter(path, "diffusers")
