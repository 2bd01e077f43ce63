"""Retrieval-augmented prompts: the knowledge base, the retriever and its stored index, and the facts in the LLM's input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sur_lightning.knowledge.knowledge_base import KnowledgeBase, bundled_knowledge_base
from sur_lightning.knowledge.rag import Retriever
from sur_lightning.models.sentence import SentenceEncoderFeatures

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
UNRELATED = "a violin concert at night"


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoderFeatures:
    return SentenceEncoderFeatures()


@pytest.fixture(scope="module")
def retriever(minilm) -> Retriever:
    return Retriever(bundled_knowledge_base("toyworld"), minilm, top_k=1, threshold=0.4)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_bundled_knowledge_base_covers_every_toy_world_object():
    from sur_lightning.toyworld.world import OBJECTS

    kb = KnowledgeBase(bundled_knowledge_base("toyworld"))
    assert not kb.skipped and len(kb) >= len(OBJECTS) + 10
    for obj in OBJECTS:
        (text,) = [t for title, t in zip(kb.titles, kb.texts) if title.lower().startswith(obj.name)]
        assert f" {obj.color} " in text, text
        assert obj.shape in text, text


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"kb.jsonl:2: not valid JSON"),
        ('{"title": "Lime"}', r'kb.jsonl:2: expected an object with string "title" and "text"'),
    ],
)
def test_a_bad_row_is_an_error_naming_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "kb.jsonl", [{"title": "Lemon", "text": "A lemon is yellow."}, bad_line])
    with pytest.raises(ValueError, match=message):
        KnowledgeBase(path)


def test_duplicate_and_empty_rows_are_skipped_and_counted(tmp_path):
    rows = [
        {"title": "Lemon", "text": "A lemon is yellow."},
        "",
        {"title": "lemon", "text": "A  lemon is YELLOW."},
        {"title": "Lime", "text": "  "},
        {"title": "Lime", "text": "A lime is green."},
    ]
    kb = KnowledgeBase(write_jsonl(tmp_path / "kb.jsonl", rows))
    assert kb.titles == ["Lemon", "Lime"] and kb.duplicates == 1
    assert kb.skipped == [
        f"{tmp_path / 'kb.jsonl'}:3: duplicate of an earlier entry 'lemon'",
        f"{tmp_path / 'kb.jsonl'}:4: empty text",
    ]
    assert "2 entries, 2 skipped (1 duplicates)" in kb.summary()


def test_retrieval_finds_the_matching_entry_and_nothing_for_an_unrelated_prompt(minilm, retriever):
    (passages,) = retriever.retrieve(["a trio of lemons on a table"])
    assert [p.title for p in passages] == ["Lemon (lemons)"] and passages[0].score >= 0.4
    assert retriever.retrieve([UNRELATED]) == [[]]
    top3 = Retriever(retriever.knowledge_base, minilm, top_k=3, threshold=-1.0).retrieve(["a single sapphire"])[0]
    assert len(top3) == 3 and top3[0].title.startswith("Sapphire") and top3[0].score >= top3[1].score >= top3[2].score


def test_augment_puts_the_facts_in_the_template_and_leaves_a_prompt_without_facts_alone(minilm):
    retriever = Retriever(bundled_knowledge_base("toyworld"), minilm, template="Facts: {facts}\nPrompt: {prompt}")
    with_facts, without = retriever.augment(["a pair of limes", UNRELATED])
    assert (
        with_facts
        == "Facts: A lime is a small round green citrus fruit, shaped like a circle.\nPrompt: a pair of limes"
    )
    assert without == UNRELATED
    text, start = retriever.augment_spans(["a pair of limes"])[0]
    assert text[start:] == "a pair of limes"


def test_a_template_must_put_the_facts_before_the_prompt():
    with pytest.raises(ValueError, match="before"):
        Retriever(bundled_knowledge_base("toyworld"), template="{prompt} ({facts})")


def test_the_index_is_stored_reused_and_rebuilt_when_the_knowledge_base_or_encoder_changes(tmp_path, minilm):
    from sur_lightning.models.random_models import build_tiny_bert

    kb = shutil.copy(bundled_knowledge_base("toyworld"), tmp_path / "kb.jsonl")
    first = Retriever(kb, minilm, index_dir=tmp_path / "rag")
    embeddings = first.embeddings
    assert first.built_index and (first.index_folder() / "embeddings.safetensors").exists()
    again = Retriever(kb, minilm, index_dir=tmp_path / "rag")
    assert torch.equal(again.embeddings, embeddings) and not again.built_index

    with open(kb, "a") as f:
        f.write(json.dumps({"title": "Banana", "text": "A banana is a long curved yellow fruit."}) + "\n")
    changed = Retriever(kb, minilm, index_dir=tmp_path / "rag")
    assert changed.embeddings.shape[0] == embeddings.shape[0] + 1 and changed.built_index
    assert changed.index_folder() != first.index_folder()
    other_encoder = Retriever(kb, build_tiny_bert(tmp_path / "bert"), index_dir=tmp_path / "rag")
    assert other_encoder.index_key() != changed.index_key()
    assert other_encoder.embeddings.shape[1] == 32 and other_encoder.built_index


def test_the_retrieved_facts_reach_the_llm_input(tiny_llm, retriever):
    from sur_lightning.models.llm import CausalLMFeatures

    features = CausalLMFeatures(tiny_llm, rag=retriever, pooling="none")
    fed = []
    hook = features.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"]), with_kwargs=True)
    states, mask = features(["a pair of lemons on a table", UNRELATED])
    hook.remove()
    decoded = features.tokenizer.batch_decode(fed[0], skip_special_tokens=True)
    assert decoded[0].startswith("a lemon is a round yellow citrus fruit") and decoded[0].endswith(
        "a pair of lemons on a table"
    )
    assert decoded[1] == UNRELATED

    # rag_pooling="prompt": the features cover the prompt's own tokens (plus the special ones), as without RAG.
    plain_states, plain_mask = CausalLMFeatures(tiny_llm, pooling="none")(["a pair of lemons on a table", UNRELATED])
    assert mask.sum(1).tolist() == plain_mask.sum(1).tolist()
    # The prompt's tokens attended to the facts: their states change; a prompt without facts is untouched.
    assert not torch.allclose(states[0][mask[0]], plain_states[0][plain_mask[0]])
    torch.testing.assert_close(states[1][mask[1]], plain_states[1][plain_mask[1]])
    _, all_mask = CausalLMFeatures(tiny_llm, rag=retriever, rag_pooling="all", pooling="none")(
        ["a pair of lemons on a table"]
    )
    assert all_mask.sum() > mask[0].sum()


def test_the_llm_cache_fingerprint_changes_with_rag_and_with_the_knowledge_base(tmp_path, tiny_llm, cache_dir):
    from hydra.utils import instantiate

    from sur_lightning.training.feature_store import llm_fingerprint

    kb = shutil.copy(bundled_knowledge_base("toyworld"), tmp_path / "kb.jsonl")
    base = ["llm=tiny", f"paths.cache_dir={cache_dir}", f"paths.root_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        off = compose(config_name="train", overrides=base)
        on = compose(config_name="train", overrides=[*base, "+llm/rag=toyworld", f"llm.rag.knowledge_base={kb}"])
    assert "rag" not in llm_fingerprint(off.llm)
    before = llm_fingerprint(on.llm)
    assert before["rag"]["knowledge_base"] == KnowledgeBase(kb).content_hash and before != llm_fingerprint(off.llm)
    with open(kb, "a") as f:
        f.write(json.dumps({"title": "Banana", "text": "A banana is a long curved yellow fruit."}) + "\n")
    assert llm_fingerprint(on.llm) != before
    features = instantiate(on.llm)
    assert isinstance(features.rag, Retriever) and features.rag_pooling == "prompt"
    assert features.rag.index_dir == Path(cache_dir) / "rag"


def test_the_probe_takes_hydra_overrides_and_builds_the_llm_with_rag(tiny_llm, cache_dir, monkeypatch):
    from sur_lightning.toyworld import probe

    seen = []
    # The probe itself (20 logistic fits) is tested in test_toyworld.py; here only what main builds from the overrides.
    monkeypatch.setattr(probe, "probe_llm", lambda llm: seen.append(llm) or {"accuracy": 0.5})
    result = probe.main(["llm=tiny", f"paths.cache_dir={cache_dir}", "+llm/rag=toyworld", "llm.rag_pooling=all"])
    assert result == {"accuracy": 0.5} and isinstance(seen[0].rag, Retriever) and seen[0].rag_pooling == "all"
    probe.main(["llm=tiny", f"paths.cache_dir={cache_dir}"])
    assert seen[1].rag is None


def test_the_empty_prompt_gets_a_feature_from_a_tokenizer_without_bos(retriever, cache_dir):
    """SmolLM2's tokenizer adds no BOS: "" (classifier-free guidance's prompt) tokenizes to nothing, so there
    are no offsets to mark facts in; the feature cache encodes it in a batch of its own."""
    from sur_lightning.models.llm import CausalLMFeatures, convert_smollm2_gguf

    llm = CausalLMFeatures(convert_smollm2_gguf(cache_dir / "smollm2-135m-instruct"), rag=retriever)
    states, mask = llm([""])
    assert mask is None and states.shape == (1, 576) and torch.isfinite(states).all()
