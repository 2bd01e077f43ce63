"""The LLM feature: ``llm.layer`` is a 0-based block index, read before the final norm, and the blocks after it never run."""

from pathlib import Path

import pytest
import torch

from sur_lightning.models.llm import CausalLMFeatures
from sur_lightning.models.random_models import build_tiny_causal_lm

PROMPTS = ["a pair of tomatoes on a table", "a lemon"]


@pytest.fixture(scope="module")
def three_block_llm(tmp_path_factory) -> str:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llm3"), num_layers=3)


def reference_hidden_states(features: CausalLMFeatures) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    tokens = features.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = features.model(**tokens, output_hidden_states=True)
    return out.hidden_states, tokens.attention_mask.bool()


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -3])
def test_block_output_matches_transformers_hidden_states(three_block_llm, layer):
    features = CausalLMFeatures(three_block_llm, layer=layer, pooling="none")
    states, mask = features(PROMPTS)
    hidden, ref_mask = reference_hidden_states(features)
    block = layer % 3
    assert torch.equal(mask, ref_mask)
    if block < 2:
        # hidden_states[k + 1] is block k's output for every block but the last.
        torch.testing.assert_close(states, hidden[block + 1])
    else:
        # The last entry of hidden_states has the final RMSNorm applied; the feature is the block's own output.
        assert not torch.allclose(states, hidden[3])
        torch.testing.assert_close(features.model.norm(states), hidden[3])


def test_blocks_after_the_layer_do_not_run(three_block_llm):
    features = CausalLMFeatures(three_block_llm, layer=0)
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(features.blocks)]
    hooks.append(features.model.norm.register_forward_hook(lambda m, a, o: ran.append("norm")))
    pooled, _ = features(PROMPTS)
    for hook in hooks:
        hook.remove()
    assert ran == [0] and pooled.shape == (2, 32)


def test_mean_pooling_ignores_padding(three_block_llm):
    features = CausalLMFeatures(three_block_llm, layer=-1)
    pooled, _ = features(PROMPTS)
    alone, _ = features(PROMPTS[1:])
    torch.testing.assert_close(pooled[1:], alone, atol=1e-5, rtol=1e-5)


def test_an_out_of_range_layer_names_the_block_count(three_block_llm):
    with pytest.raises(ValueError, match=r"llm.layer=3 is out of range .* 3 blocks"):
        CausalLMFeatures(three_block_llm, layer=3)


def test_trust_remote_code_is_passed_false_unless_the_config_turns_it_on(compose, monkeypatch):
    from hydra.utils import instantiate

    import sur_lightning.models.llm as llm_module

    calls = []
    real = llm_module.load_pretrained

    def spy(cls, pretrained, key, **kwargs):
        calls.append((cls.__name__, kwargs.get("trust_remote_code", "missing")))
        return real(cls, pretrained, key, **kwargs)

    monkeypatch.setattr(llm_module, "load_pretrained", spy)
    for llm in ("tiny", "t5_tiny"):
        instantiate(compose(f"llm={llm}").llm)
    assert {c[0] for c in calls} == {"AutoTokenizer", "AutoModelForCausalLM", "T5EncoderModel"}
    assert {c[1] for c in calls} == {False}
    calls.clear()
    instantiate(compose("llm=tiny", "llm.trust_remote_code=true").llm)
    assert {c[1] for c in calls} == {True}


def test_quantized_llm_preset_composes_and_on_cpu_fails_naming_the_key(compose, monkeypatch):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose("+experiment=sur_paper", "llm=llama13b_8bit")
    assert cfg.llm.quantization == "8bit" and cfg.llm.pretrained == "huggyllama/llama-13b" and cfg.llm.layer == 39
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The check comes before any download: this fails at once, offline, without touching the hub.
    with pytest.raises(InstantiationException, match=r"llm.quantization=8bit .*needs a CUDA GPU"):
        instantiate(cfg.llm)
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(InstantiationException, match=r"llm.quantization=4bit needs bitsandbytes"):
        instantiate(compose("llm=llama13b_8bit", "llm.quantization=4bit").llm)
    with pytest.raises(InstantiationException, match=r"llm.quantization must be null, '8bit' or '4bit', got '2bit'"):
        instantiate(compose("llm=llama13b_8bit", "llm.quantization=2bit").llm)


def test_a_random_llm_like_another_has_its_shape_and_tokens_but_not_its_weights(tmp_path, tiny_llm):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sur_lightning.models.random_models import build_random_causal_lm_like

    before = torch.random.get_rng_state()
    # The tiny LLM is itself random, drawn with seed 0: another seed gives other weights.
    folder = build_random_causal_lm_like(tmp_path / "random", like=tiny_llm, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    mtime = (Path(folder) / "random_spec.json").stat().st_mtime_ns
    assert build_random_causal_lm_like(tmp_path / "random", like=tiny_llm, seed=3) == folder
    assert (Path(folder) / "random_spec.json").stat().st_mtime_ns == mtime  # built once
    assert (
        AutoConfig.from_pretrained(folder).to_dict()["hidden_size"] == AutoConfig.from_pretrained(tiny_llm).hidden_size
    )
    real, random = (AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (tiny_llm, folder))
    assert real.keys() == random.keys() and all(real[k].shape == random[k].shape for k in real)
    assert not torch.equal(real["model.embed_tokens.weight"], random["model.embed_tokens.weight"])
    states_real, mask_real = CausalLMFeatures(tiny_llm, pooling="none")(["two red circles"])
    states_random, mask_random = CausalLMFeatures(folder, pooling="none")(["two red circles"])
    assert torch.equal(mask_real, mask_random) and states_real.shape == states_random.shape
