"""Name dropout (issue 19 §3): a training sample's object renamed to a nonsense word in its prompt and in its
retrieved fact, drawn per (seed, epoch, row id), cached as K variants per caption; and the LLM-side span probe."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR, open_cache, tiny_overrides
from hydra.utils import instantiate

from sur_lightning.knowledge.knowledge_base import KnowledgeBase, bundled_knowledge_base
from sur_lightning.knowledge.name_dropout import PLACEHOLDER_WORDS, NameDropout, name_lexicon
from sur_lightning.knowledge.rag import Retriever
from sur_lightning.toyworld.world import COUNTS, OBJECTS, OBJECTS_BY_NAME, TEMPLATES, complex_prompt, narrative_prompt


def every_toy_prompt() -> list[str]:
    return [narrative_prompt(obj, count, t) for obj in OBJECTS for count in COUNTS for t in range(len(TEMPLATES))]


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def names_word(text: str, singular: str, plural: str) -> bool:
    """Does ``text`` contain either form of a name as a whole word (or phrase)?"""
    return bool(re.search(rf"(?<![\w-])({re.escape(plural)}|{re.escape(singular)})(?![\w-])", text, re.IGNORECASE))


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase(bundled_knowledge_base("toyworld"))


@pytest.fixture(scope="module")
def renamer(kb) -> NameDropout:
    return NameDropout.for_knowledge_base(kb, variants=4)


@pytest.fixture(scope="module")
def minilm():
    from sur_lightning.models.sentence import SentenceEncoderFeatures

    return SentenceEncoderFeatures()


@pytest.fixture(scope="module")
def renaming_retriever(kb, minilm) -> Retriever:
    return Retriever(kb, minilm, top_k=1, threshold=0.4, name_dropout=0.5, name_variants=4)


# ---------------------------------------------------------------------------------------- the words


def test_no_placeholder_occurs_in_any_toy_world_prompt_or_knowledge_entry(kb, tiny_llm):
    from transformers import AutoTokenizer

    forms = {w for word in PLACEHOLDER_WORDS for w in (word, word + "s")}
    assert len(set(PLACEHOLDER_WORDS)) == len(PLACEHOLDER_WORDS) >= 4 * len(OBJECTS)
    assert all(re.fullmatch(r"[bdfgklmnprstvz][aeiou][bdfgklmnprstvz][aeiou][bfgkp]", w) for w in PLACEHOLDER_WORDS)
    texts = every_toy_prompt() + [complex_prompt(c, o.color, o.shape) for o in OBJECTS for c in COUNTS]
    texts += [w for wordings in kb.wordings for w in wordings] + kb.titles
    seen = set().union(*(words_of(t) for t in texts))
    assert not forms & seen
    # Nor inside a word: no object, colour or shape word hides in a placeholder ("redo" would hold "red").
    vocabulary = {o.name for o in OBJECTS} | {o.color for o in OBJECTS} | {o.shape for o in OBJECTS}
    assert not [w for w in PLACEHOLDER_WORDS for v in vocabulary if v in w]
    # Not a whole word of the CLIP vocabulary either (the tiny LLM's tokenizer is the real CLIP BPE).
    clip = AutoTokenizer.from_pretrained(tiny_llm)
    assert all(len(clip.tokenize(w)) >= 2 for w in PLACEHOLDER_WORDS)


def test_the_lexicon_is_the_knowledge_bases_plural_titles_which_are_the_toy_world_objects(kb):
    assert set(name_lexicon(kb)) == {(o.name, o.plural) for o in OBJECTS}
    with pytest.raises(ValueError, match="name_variants=8 for 20 objects needs 160 placeholder words"):
        NameDropout(name_lexicon(kb), variants=8)


# ---------------------------------------------------------------------------------------- renaming


def test_every_variant_of_every_prompt_is_renamed_and_undone_exactly(renamer):
    for prompt in every_toy_prompt():
        index = renamer.find(prompt)
        singular, plural = renamer.names[index]
        variants = renamer.all_variants(prompt)
        assert len(set(variants)) == 4
        for k, variant in enumerate(variants):
            (word,) = renamer.placeholders_in(variant)
            assert not names_word(variant, singular, plural) and word in variant
            assert renamer.invert(variant) == (prompt, index, word, k)
            assert renamer.variant(prompt, k) == variant
    # A renamed text names its original exactly: no two prompts share a variant.
    all_variants = [v for p in every_toy_prompt() for v in renamer.all_variants(p)]
    assert len(set(all_variants)) == len(all_variants)
    # Variant k does not depend on K; a word stands for many objects across prompts.
    two = NameDropout(renamer.names, variants=2)
    assert two.all_variants("a pair of limes") == renamer.all_variants("a pair of limes")[:2]
    assert two.invert(renamer.variant("a pair of limes", 3)) is None
    objects_per_word = Counter(
        renamer.placeholders_in(v).pop() for p in every_toy_prompt() for v in renamer.all_variants(p)
    )
    assert len(objects_per_word) > 0.8 * len(PLACEHOLDER_WORDS)
    # Prompts that name no single object are left alone, and ordinary text inverts to nothing.
    assert renamer.all_variants("two red circles") == [] and renamer.variant("a lime and a lemon", 0) is None
    assert renamer.invert("a pair of tomatoes") is None


def test_the_renamed_prompt_and_its_fact_share_the_placeholder_and_name_neither_form(renaming_retriever, renamer):
    prompts = [
        narrative_prompt(obj, count, (i + count) % len(TEMPLATES)) for i, obj in enumerate(OBJECTS) for count in COUNTS
    ]
    variants = [renamer.variant(p, (i % 4)) for i, p in enumerate(prompts)]
    plain = Retriever(renaming_retriever.knowledge_base, renaming_retriever.encoder)
    for prompt, variant, (text, start), (original_text, original_start) in zip(
        prompts, variants, renaming_retriever.augment_spans(variants), plain.augment_spans(prompts)
    ):
        obj = OBJECTS[[o.name for o in OBJECTS].index(renamer.names[renamer.find(prompt)][0])]
        (word,) = renamer.placeholders_in(variant)
        fact = text[:start]
        assert text[start:] == variant and word in fact.lower(), (prompt, text)
        assert not names_word(text, obj.name, obj.plural) or obj.name == "orange"
        # The fact is the original's (retrieval ran on the original prompt), with the name replaced.
        assert fact == renamer.rename_fact(original_text[:original_start], renamer.find(prompt), word)
        assert f" {obj.color} " in fact and obj.shape in fact
    ((text, start),) = renaming_retriever.augment_spans([renamer.variant("a pair of tomatoes", 0)])
    word = renamer.placeholders_in(text).pop()
    assert text == f"A {word} is a round red fruit, shaped like a circle.\na pair of {word}s"
    # "orange" is the object's name and its colour: the colour stays, the name goes.
    ((text, start),) = renaming_retriever.augment_spans([renamer.variant("a single orange", 1)])
    word = renamer.placeholders_in(text).pop()
    assert text == f"A {word} is a round orange citrus fruit, shaped like a circle.\na single {word}"
    assert renamer.rename_fact("An emerald is green. Emeralds are gems.", renamer.find("an emerald"), "sukeb") == (
        "A sukeb is green. Sukebs are gems."
    )
    # Prompts that were never renamed read as before; a placeholder that is no variant is an error.
    assert renaming_retriever.augment(["a pair of limes", "a violin concert"]) == plain.augment(
        ["a pair of limes", "a violin concert"]
    )
    with pytest.raises(ValueError, match="no renamed variant"):
        renaming_retriever.augment(["a pair of sukebs and a zemip"])


def test_anonymise_reads_every_named_prompt_as_its_variant_0_and_leaves_the_rest(renaming_retriever, renamer):
    anonymous = Retriever(renaming_retriever.knowledge_base, renaming_retriever.encoder, anonymise=True)
    plain = Retriever(renaming_retriever.knowledge_base, renaming_retriever.encoder)
    for prompt in ("a pair of tomatoes", "a single plum on a table", "a trio of emeralds"):
        (text,) = anonymous.augment([prompt])
        assert text == renaming_retriever.augment([renamer.variant(prompt, 0)])[0] != plain.augment([prompt])[0]
        assert not names_word(text, *renamer.names[renamer.find(prompt)])
        # A prompt name dropout renamed already keeps its own variant.
        renamed = renamer.variant(prompt, 2)
        assert anonymous.augment([renamed]) == renaming_retriever.augment([renamed])
    assert anonymous.augment(["a violin concert", "two red circles"]) == plain.augment(
        ["a violin concert", "two red circles"]
    )
    assert anonymous.fingerprint()["anonymise"] is True and "anonymise" not in plain.fingerprint()


def test_vary_wording_reads_variant_k_in_wording_k_mod_w_and_every_wording_keeps_colour_and_shape(
    renaming_retriever, renamer, kb
):
    varied = Retriever(kb, renaming_retriever.encoder, name_dropout=1.0, name_variants=4, vary_wording=True)
    assert varied.fingerprint() == {**renaming_retriever.fingerprint(), "vary_wording": True}
    for obj in OBJECTS:
        prompt = narrative_prompt(obj, 2, 0)
        facts = []
        for k in range(4):
            variant = renamer.variant(prompt, k)
            (word,) = renamer.placeholders_in(variant)
            ((text, start),) = varied.augment_spans([variant])
            fact = text[:start].strip()
            wording = kb.wordings[kb.titles.index(next(t for t in kb.titles if t.lower().startswith(obj.name + " (")))]
            assert len(wording) == 4 and fact == renamer.rename_fact(wording[k], renamer.find(prompt), word)
            # Every wording names the object (renamed here), its colour and its shape, and no other colour.
            assert word in fact.lower() and not names_word(fact.replace(obj.color, ""), obj.name, obj.plural)
            assert re.search(rf"\b{obj.color}\b", fact) and obj.shape in fact
            assert not (words_of(fact) & ({o.color for o in OBJECTS} - {obj.color}))
            facts.append(fact.replace(word, "_").replace(word.capitalize(), "_"))
        assert len(set(facts)) == 4  # four different sentences
        # Variant 0, what anonymise reads at inference, reads the entry's text, as without vary_wording.
        assert varied.augment([renamer.variant(prompt, 0)]) == renaming_retriever.augment([renamer.variant(prompt, 0)])
    with pytest.raises(ValueError, match="vary_wording needs name dropout"):
        Retriever(kb, renaming_retriever.encoder, vary_wording=True)


def test_variant_mean_is_for_generation_and_changes_no_llm_input(renaming_retriever, renamer, kb):
    mean = Retriever(kb, renaming_retriever.encoder, name_dropout=1.0, name_variants=4, variant_mean=True)
    assert mean.variant_mean and not renaming_retriever.variant_mean
    # The LLM's states (and the feature cache's key) are what they were without it.
    assert mean.fingerprint() == renaming_retriever.fingerprint()
    prompts = [renamer.variant("a pair of tomatoes on a table", k) for k in range(4)]
    assert mean.augment(prompts) == renaming_retriever.augment(prompts)
    with pytest.raises(ValueError, match="variant_mean needs name dropout"):
        Retriever(kb, renaming_retriever.encoder, variant_mean=True)


def test_a_bad_wordings_field_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text(
        '{"title": "Lime (limes)", "text": "A lime is green."}\n{"title": "Pea (peas)", "text": "A pea is green.", "wordings": "Peas are green."}\n'
    )
    with pytest.raises(ValueError, match=r"kb.jsonl:2: \"wordings\" must be a list of non-empty strings"):
        KnowledgeBase(path)


def test_the_unseen_objects_preset_is_the_benchmark_row_that_reads_facts_anonymised_in_varied_wordings(compose):
    from conftest import load_experiment_script
    from omegaconf import OmegaConf

    run = load_experiment_script("toyworld_benchmark/run.py", "toyworld_benchmark_run")
    preset, overrides, _ = run.ROWS["ella_name_dropout_p1_anonymise"]
    cfg = compose("+experiment=ella_unseen_objects", tiny=False)
    row = compose(
        f"+experiment={preset}",
        *overrides,
        "llm.rag.vary_wording=true",
        "llm.rag.variant_mean=true",
        "trainer.max_steps=9600",
        "task_name=ella_unseen_objects",
        tiny=False,
    )
    assert OmegaConf.to_container(cfg.llm) == OmegaConf.to_container(row.llm)
    assert cfg.llm.rag.anonymise and cfg.llm.rag.vary_wording and cfg.llm.rag.variant_mean
    assert cfg.data.name_dropout == 1.0
    assert cfg.trainer.max_steps == 9600
    # Everything else too, but the tags (unresolved: the loggers interpolate the tags).
    preset_cfg, row_cfg = OmegaConf.to_container(cfg), OmegaConf.to_container(row)
    assert preset_cfg.pop("tags") != row_cfg.pop("tags") and preset_cfg == row_cfg


def test_the_rate_is_respected_and_the_variant_is_uniform(renamer):
    prompt = "a pair of tomatoes on a table"
    draws = [renamer.draw(prompt, 0.3, f"0:{epoch}:row{i}") for epoch in range(4) for i in range(1000)]
    renamed = [d for d in draws if d != prompt]
    assert abs(len(renamed) / len(draws) - 0.3) < 0.03
    counts = Counter(renamed)
    assert set(counts) == set(renamer.all_variants(prompt)) and min(counts.values()) > 0.2 * len(renamed)
    assert all(renamer.draw(prompt, 1.0, f"k{i}") != prompt for i in range(200))
    assert all(renamer.draw(prompt, 0.0, f"k{i}") == prompt for i in range(200))
    # The same key always gives the same answer.
    assert [renamer.draw(prompt, 0.3, f"0:{e}:row{i}") for e in range(4) for i in range(1000)] == draws


# ---------------------------------------------------------------------------------------- configs and data


def compose_world(root: Path, cache_dir: Path, *overrides: str):
    """The tiny overrides on the toy world's adapter-train data (one image per combination)."""
    from hydra import compose, initialize_config_dir

    tiny = [o for o in tiny_overrides(root, cache_dir) if not o.startswith(("data=", "data.root.", "connector."))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[*tiny, "data=toyworld", "data.root.images_per_combo=1", "~callbacks.sample_grid", *overrides],
        )


def test_p0_changes_no_fingerprint_and_no_prompt(tmp_path, cache_dir, tiny_sd, tiny_llm):
    from sur_lightning.training.feature_store import llm_fingerprint

    rag = ["+llm/rag=toyworld"]
    default = compose_world(tmp_path, cache_dir, *rag)
    assert default.llm.rag.name_dropout == 0.0 and default.data.name_dropout == 0.0
    before = compose_world(tmp_path, cache_dir, *rag, "~llm.rag.name_dropout", "~llm.rag.name_variants")
    assert llm_fingerprint(default.llm) == llm_fingerprint(before.llm)
    assert llm_fingerprint(compose_world(tmp_path, cache_dir, *rag, "llm.rag.name_variants=2").llm) == llm_fingerprint(
        before.llm
    )
    assert "name_dropout" not in llm_fingerprint(default.llm)["rag"]
    anonymous = compose_world(tmp_path, cache_dir, *rag, "llm.rag.anonymise=true")
    assert instantiate(anonymous.llm.rag).anonymise and llm_fingerprint(anonymous.llm)["rag"]["anonymise"] is True
    on = {
        p: llm_fingerprint(compose_world(tmp_path, cache_dir, *rag, f"llm.rag.name_dropout={p}").llm)
        for p in (0.25, 0.5)
    }
    assert on[0.25] == on[0.5] != llm_fingerprint(default.llm) and on[0.5]["rag"]["name_dropout"]["version"] == 1

    # With p = 0 (or without RAG) the data serve the rows' own prompts and the cache lists no variants.
    datamodule = instantiate(default.data)
    datamodule.setup("fit")
    assert datamodule.renamer is None and datamodule.renamed_prompts() == []
    train = datamodule.train_set
    assert [train[(0, i)]["simple_prompt"] for i in range(len(train))] == [r.simple for r in train.rows]
    assert instantiate(compose_world(tmp_path, cache_dir).data).renamer is None


def test_the_dataset_renames_training_rows_keyed_by_seed_epoch_and_row_not_validation(
    tmp_path, cache_dir, tiny_sd, tiny_llm
):
    cfg = compose_world(tmp_path, cache_dir, "+llm/rag=toyworld", "llm.rag.name_dropout=0.5")
    assert cfg.data.name_dropout == 0.5 and cfg.data.name_variants == 4
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    train = datamodule.train_set
    epochs = [[train[(epoch, i)]["simple_prompt"] for i in range(len(train))] for epoch in range(6)]
    renamed = [(p, row) for prompts in epochs for p, row in zip(prompts, train.rows) if p != row.simple]
    assert 0.3 < len(renamed) / (len(epochs) * len(train)) < 0.7
    assert all(p in datamodule.renamer.all_variants(row.simple) for p, row in renamed)
    assert epochs[0] != epochs[1]  # a fresh draw every epoch
    # The same (seed, epoch, row) in a fresh datamodule (another process, a resumed run): the same prompt.
    again = instantiate(cfg.data)
    again.setup("fit")
    assert [again.train_set[(3, i)]["simple_prompt"] for i in range(len(train))] == epochs[3]
    # The image side draws what it drew without name dropout; validation is never renamed.
    plain = instantiate(compose_world(tmp_path, cache_dir, "+llm/rag=toyworld").data)
    plain.setup("fit")
    assert torch.equal(plain.train_set[(2, 0)]["pixel_values"], train[(2, 0)]["pixel_values"])
    assert [datamodule.val_set[i]["simple_prompt"] for i in range(len(datamodule.val_set))] == [
        r.simple for r in datamodule.val_set.rows
    ]
    assert {p for p, _ in datamodule.renamed_prompts()} == {
        v for r in train.rows for v in datamodule.renamer.all_variants(r.simple)
    }


def test_name_dropout_without_retrieval_or_with_other_variants_is_an_error(tmp_path, cache_dir, tiny_sd, tiny_llm):
    from hydra.errors import InstantiationException

    from sur_lightning.training.feature_cache import check_name_dropout

    with pytest.raises(InstantiationException, match="needs retrieval"):
        instantiate(compose_world(tmp_path, cache_dir, "data.name_dropout=0.5").data)
    cfg = compose_world(tmp_path, cache_dir, "+llm/rag=toyworld", "data.name_dropout=0.5")
    with pytest.raises(ValueError, match="llm.rag.name_dropout is off"):
        check_name_dropout(instantiate(cfg.data), cfg.llm.get("rag"))
    cfg = compose_world(tmp_path, cache_dir, "+llm/rag=toyworld", "llm.rag.name_dropout=0.5", "data.name_variants=2")
    with pytest.raises(ValueError, match="data.name_variants=2 but llm.rag.name_variants=4"):
        check_name_dropout(instantiate(cfg.data), cfg.llm.get("rag"))


@pytest.mark.slow
def test_the_cache_holds_every_variant_so_a_cached_training_step_needs_no_llm(
    tmp_path, cache_dir, tiny_sd, tiny_llm, monkeypatch
):
    from sur_lightning.models.llm import CausalLMFeatures
    from sur_lightning.train import train
    from sur_lightning.training.feature_cache import build_cache, extra_prompts, missing_entries
    from sur_lightning.training.feature_store import FeatureCache

    overrides = [
        "+experiment=ella_demo", "backbone=tiny", "llm=tiny", "llm.pooling=none",
        "+llm/rag=toyworld", "llm.rag_pooling=all", "llm.rag.name_dropout=1.0",
        "data.cache=auto", f"data.cache_dir={tmp_path / 'features'}", "data.batch_size=4",
        "trainer.max_steps=2", "+trainer.limit_val_batches=0", "model.caption_dropout=0",
    ]  # fmt: skip
    cfg = compose_world(tmp_path, cache_dir, *overrides)
    datamodule = instantiate(cfg.data)
    cache = open_cache(cfg)
    build_cache(datamodule, cache, extra_prompts(cfg.get("callbacks")))
    variants = datamodule.renamed_prompts()
    assert len(variants) == 4 * len(datamodule.train_set.rows)
    assert sum(len(v) for v in missing_entries(cache, datamodule, [""]).values()) == 0
    llm = instantiate(cfg.llm)
    for prompt, _ in variants[:3]:
        # Keyed by the renamed prompt's text; the states are those of the renamed fact + renamed prompt.
        cached = cache.text_features([prompt])
        states, mask = llm([prompt])
        torch.testing.assert_close(cached.llm[0][cached.llm_mask[0]], states[0][mask[0]])
        assert FeatureCache.lookup(cache.clip, prompt)["states"].shape == (77, 32)

    def refuse(*args, **kwargs):
        raise AssertionError("built an LLM although every variant is cached")

    served = []
    monkeypatch.setattr(CausalLMFeatures, "__init__", refuse)
    real_lookup = FeatureCache.text_features
    monkeypatch.setattr(
        FeatureCache,
        "text_features",
        lambda self, prompts, device="cpu": served.extend(prompts) or real_lookup(self, prompts, device),
    )
    metrics = train(compose_world(tmp_path, cache_dir, *overrides, "data.cache=require"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert len(served) == 8 and all(p in {v for v, _ in variants} for p in served)  # p = 1: every sample renamed


@pytest.mark.slow
def test_the_evaluation_during_training_reads_the_mean_over_variants_from_the_cache(
    tmp_path, cache_dir, tiny_sd, tiny_llm, monkeypatch
):
    from sur_lightning.generation.conditioning import VariantMeanConditioning
    from sur_lightning.train import train
    from sur_lightning.training.callbacks import EvaluationCallback
    from sur_lightning.training.feature_cache import extra_prompts
    from sur_lightning.training.feature_store import FeatureCache

    overrides = [
        "+experiment=ella_unseen_objects", "backbone=tiny", "llm=tiny", "llm.pooling=none",
        "callbacks=toyworld_smoke", "callbacks.evaluation.prompts.per_split=2", "data.cache=auto", f"data.cache_dir={tmp_path / 'features'}",
        "data.batch_size=4", "trainer.max_steps=2", "+trainer.limit_val_batches=0", "model.caption_dropout=0",
    ]  # fmt: skip

    def compose(*extra: str):
        from hydra import compose, initialize_config_dir

        # The toy world's own callbacks (a held-out suite), not the tiny ones' prompt list.
        tiny = [
            o
            for o in tiny_overrides(tmp_path, cache_dir)
            if not o.startswith(("data=", "data.root.", "callbacks", "connector."))
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=[*tiny, "data.root.images_per_combo=1", *overrides, *extra])

    cfg = compose()
    assert cfg.callbacks.evaluation.retriever.variant_mean
    renamer = instantiate(cfg.llm.rag).renamer
    evaluated = [p.prompt for p in instantiate(cfg.callbacks.evaluation).prompts]
    variants = [renamer.variant(p, k) for k in range(1, renamer.variants) for p in evaluated]
    assert len(variants) == 3 * len(evaluated) and all(variants)  # every held-out prompt names its object
    assert set(variants) <= set(extra_prompts(cfg.callbacks))
    # Read as variant 0 (the setting off): nothing renamed is asked of the cache for the evaluation.
    off = compose("llm.rag.variant_mean=false")
    assert not set(variants) & set(extra_prompts(off.callbacks))

    served, read_as = [], []
    real_lookup, real_conditioning = FeatureCache.text_features, EvaluationCallback.adapter_conditioning
    monkeypatch.setattr(
        FeatureCache,
        "text_features",
        lambda self, prompts, device="cpu": served.extend(prompts) or real_lookup(self, prompts, device),
    )
    monkeypatch.setattr(
        EvaluationCallback,
        "adapter_conditioning",
        lambda self, module: read_as.append(real_conditioning(self, module)) or read_as[-1],
    )
    metrics = train(cfg)
    assert read_as and all(isinstance(c, VariantMeanConditioning) for c in read_as)
    assert read_as[0].variants == renamer.variants
    assert set(variants) <= set(served)  # from the cache: a cached run builds no LLM to read them
    assert "eval/adapter/color_accuracy" in metrics


# ---------------------------------------------------------------------------------------- the span probe


def test_the_span_probe_pools_the_fact_tokens_and_the_prompt_tokens(tiny_llm, kb, minilm, monkeypatch):
    from sur_lightning.models.llm import CausalLMFeatures
    from sur_lightning.toyworld import probe

    retriever = Retriever(kb, minilm)
    llm = CausalLMFeatures(tiny_llm, rag=retriever)
    tokenizer = llm.tokenizer
    prompts = ["a pair of lemons on a table", "a violin concert at night"]
    fed = []
    hook = llm.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"]), with_kwargs=True)
    tokens = llm.token_states(prompts, spans=True)
    hook.remove()
    ids = fed[0]
    (text, start), _ = retriever.augment_spans(prompts)

    def decoded(row, mask):
        return tokenizer.decode(ids[row][mask[row]])

    def plain(s):
        return tokenizer.decode(tokenizer(s, add_special_tokens=False).input_ids)

    assert decoded(0, tokens.facts) == plain(text[:start]) and decoded(0, tokens.prompt) == plain(prompts[0])
    assert not tokens.facts[1].any() and decoded(1, tokens.prompt) == plain(prompts[1])
    special = tokens.mask & ~tokens.facts & ~tokens.prompt
    assert (tokens.facts & tokens.prompt).sum() == 0 and special.sum(1).tolist() == [2, 2]  # BOS and EOS
    assert set(ids[special].tolist()) == {tokenizer.bos_token_id, tokenizer.eos_token_id}
    # forward is unchanged: rag_pooling=prompt covers prompt + special tokens, "all" every real token.
    _, mask = CausalLMFeatures(tiny_llm, rag=retriever, pooling="none")(prompts)
    assert torch.equal(mask, tokens.mask & ~tokens.facts)

    fits = []
    monkeypatch.setattr(
        probe, "linear_probe", lambda features, names, colors: fits.append(features) or {"accuracy": 0.0}
    )
    few = probe.object_prompts()[::6]  # two prompts per object keep it quick
    monkeypatch.setattr(probe, "object_prompts", lambda: few)
    result = probe.probe_spans(llm)
    assert len(fits) == 2 and fits[0].shape == fits[1].shape == (len(few), 32)
    assert result["prompts_without_facts"] == 0 and not torch.allclose(fits[0], fits[1])
    renamed = probe.probe_spans(llm, renamed=True)
    assert renamed["renamed"] and retriever.renamer is None  # the probe's renamer was its own
    name = probe.object_prompts()[0][0]
    assert len(NameDropout.for_knowledge_base(kb).placeholders_in(renamed["example"])) == 1
    assert renamed["prompts_without_facts"] == 0 and not names_word(
        renamed["example"], name, OBJECTS_BY_NAME[name].plural
    )


def test_the_span_probe_is_behind_a_flag(tiny_llm, cache_dir, monkeypatch):
    from sur_lightning.toyworld import probe

    calls = []
    monkeypatch.setattr(
        probe, "probe_spans", lambda llm, renamed=False: calls.append(("spans", renamed)) or {"facts": {}}
    )
    monkeypatch.setattr(
        probe, "probe_llm", lambda llm: calls.append(("pooled", llm.rag is not None)) or {"accuracy": 0.5}
    )
    base = ["llm=tiny", f"paths.cache_dir={cache_dir}", "+llm/rag=toyworld"]
    probe.main(["--spans", *base])
    probe.main(["--spans", "--renamed", *base])
    assert probe.main(base) == {"accuracy": 0.5}
    assert calls == [("spans", False), ("spans", True), ("pooled", True)]
    with pytest.raises(ValueError, match="add --spans"):
        probe.main(["--renamed", *base])
