"""SUR-adapter, η and the adapter export, on tiny widths."""

import pytest
import torch

from sur_lightning.connectors import TextFeatures, load_connector, save_connector
from sur_lightning.connectors.sur import SURAdapter
from sur_lightning.eta import AdaptiveEta, FixedEta, LearnableEta

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
