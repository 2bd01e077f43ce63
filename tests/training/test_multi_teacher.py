"""Several teachers at once (llm=multi): one W0 and one loss term each, weighted, fixed or learned."""

from __future__ import annotations

import pytest
import torch

from sur_lightning.models.connectors import TextFeatures
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta
from sur_lightning.models.llm import CausalLMFeatures, MultiTeacherFeatures
from sur_lightning.models.random_models import build_tiny_causal_lm
from sur_lightning.training.losses import DenoisingLoss, FeatureAlignmentLoss, TeacherWeights
from sur_lightning.training.module import ConnectorTrainingModule

PROMPTS = ["a pair of tomatoes", "three red circles"]


@pytest.fixture(scope="module")
def teachers(tiny_llm, tmp_path_factory):
    narrow = build_tiny_causal_lm(tmp_path_factory.mktemp("narrow") / "llm", hidden_size=16, num_layers=1, seed=1)
    return {"wide": CausalLMFeatures(tiny_llm), "narrow": CausalLMFeatures(narrow)}


def module(backbone, llm_dim, weights, learn=False, kind="mse"):
    torch.manual_seed(0)
    adapter = SURAdapter(dim=backbone.cross_attention_dim, llm_dim=llm_dim, eta=FixedEta(0.1), num_heads=2, ff_dim=16)
    return ConnectorTrainingModule(
        backbone,
        adapter,
        DenoisingLoss(),
        torch.optim.AdamW,
        llm_loss=FeatureAlignmentLoss(kind, weight=1.0),
        teacher_weights=weights,
        learn_teacher_weights=learn,
    )


def test_each_teacher_gives_one_pooled_vector_of_its_own_width(teachers):
    multi = MultiTeacherFeatures(teachers, {"wide": 3, "narrow": 1})
    states, mask = multi(PROMPTS)
    assert mask is None and multi.hidden_size == {"wide": 32, "narrow": 16}
    assert states["wide"].shape == (2, 32) and states["narrow"].shape == (2, 16)
    torch.testing.assert_close(states["narrow"], teachers["narrow"](PROMPTS)[0])
    assert multi.weights == {"wide": 0.75, "narrow": 0.25}


def test_total_is_the_weighted_sum_and_each_w0_gets_only_its_own_gradient(backbone, teachers):
    multi = MultiTeacherFeatures(teachers)
    states, _ = multi(PROMPTS)
    features = TextFeatures(clip=backbone.encode_prompt(PROMPTS), llm=states)
    m = module(backbone, multi.hidden_size, {"wide": 0.75, "narrow": 0.25})
    assert set(m.connector.llm_projection) == {"wide", "narrow"}
    out = m.connector(features)
    terms = m.llm_distillation(out.internals["encoder"], out.internals["llm_projected"])
    torch.testing.assert_close(terms["llm"], 0.75 * terms["llm/wide"] + 0.25 * terms["llm/narrow"])

    # The single-teacher loss of "narrow" alone: the same value as its term here.
    single = m.llm_loss(out.internals["encoder"], m.connector.llm_projection["narrow"](states["narrow"]))
    torch.testing.assert_close(single, terms["llm/narrow"])

    terms["llm/narrow"].backward(retain_graph=True)
    assert m.connector.llm_projection["wide"].weight.grad is None
    narrow_grad = m.connector.llm_projection["narrow"].weight.grad.clone()
    assert narrow_grad.abs().sum() > 0
    m.zero_grad()
    terms["llm"].backward()
    # d(Σ w_t L_t)/dW0_narrow = w_narrow · dL_narrow/dW0_narrow: the other teacher does not reach it.
    torch.testing.assert_close(m.connector.llm_projection["narrow"].weight.grad, 0.25 * narrow_grad)
    assert m.connector.llm_projection["wide"].weight.grad.abs().sum() > 0


def test_learned_weights_are_a_softmax_that_trains(backbone, teachers):
    weights = TeacherWeights({"wide": 0.5, "narrow": 0.5}, learn=True)
    values = weights()
    torch.testing.assert_close(sum(values.values()), torch.tensor(1.0))
    m = module(backbone, {"wide": 32, "narrow": 16}, {"wide": 1, "narrow": 1}, learn=True)
    assert any(p is m.teacher_weights.logits for p in m.trainable_parameters())
    states = MultiTeacherFeatures(teachers)(PROMPTS)[0]
    out = m.connector(TextFeatures(clip=backbone.encode_prompt(PROMPTS), llm=states))
    terms = m.llm_distillation(out.internals["encoder"], out.internals["llm_projected"])
    terms["llm"].backward()
    # The logit of the teacher with the larger term is pushed down: its gradient is the larger one.
    larger = max(("wide", "narrow"), key=lambda n: float(terms[f"llm/{n}"]))
    index = m.teacher_weights.names.index(larger)
    assert m.teacher_weights.logits.grad[index] > 0 > m.teacher_weights.logits.grad[1 - index]

    fixed = module(backbone, {"wide": 32, "narrow": 16}, {"wide": 1, "narrow": 1}, learn=False)
    assert all(p is not fixed.teacher_weights.logits for p in fixed.trainable_parameters())


def test_bad_multi_teacher_configs_are_named(backbone, teachers, tiny_llm):
    with pytest.raises(ValueError, match="must be the teachers' names"):
        MultiTeacherFeatures(teachers, {"wide": 1.0})
    with pytest.raises(ValueError, match="pooling='none'"):
        MultiTeacherFeatures({"tokens": CausalLMFeatures(tiny_llm, pooling="none")})
    m = module(backbone, {"wide": 32, "narrow": 16}, None)
    states = MultiTeacherFeatures(teachers)(PROMPTS)[0]
    out = m.connector(TextFeatures(clip=backbone.encode_prompt(PROMPTS), llm=states))
    with pytest.raises(ValueError, match="set llm.weights"):
        m.llm_distillation(out.internals["encoder"], out.internals["llm_projected"])


@pytest.mark.slow
def test_smollm2_and_minilm_train_together_each_with_its_own_w0_and_logged_term(compose):
    """The two real offline teachers (SmolLM2-135M, all-MiniLM-L6-v2), through the feature cache."""
    from conftest import open_cache

    from sur_lightning.models.connectors import load_connector
    from sur_lightning.train import train

    cfg = compose(
        "llm=multi",
        "loss=cosine",
        "data.cache=auto",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "llm.weights.smollm2=3",
        "llm.weights.minilm=1",
    )
    metrics = train(cfg)
    assert {"train/llm/smollm2", "train/llm/minilm"} <= set(metrics)
    assert metrics["train/teacher_weight/smollm2"] == pytest.approx(0.75)
    adapter = load_connector(f"{cfg.paths.output_dir}/adapter.safetensors")
    assert adapter.llm_projection["smollm2"].in_features == 576 and adapter.llm_projection["minilm"].in_features == 384
    assert open_cache(cfg).llm_dim == {"smollm2": 576, "minilm": 384}


def test_ella_with_several_teachers_is_refused_before_training(compose):
    from sur_lightning.config import IncompatibleConfigError, check_combination

    with pytest.raises(IncompatibleConfigError, match="one W0 each"):
        check_combination(compose("connector=ella", "loss=denoising", "llm=multi", tiny=False))
