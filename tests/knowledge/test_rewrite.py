"""The prompt rewriter (LLM-inference distillation): cached rewrites, ranks, the toy-world parse, and the
alignment to CLIP(rewrite) in training."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from sur_lightning.knowledge.rewriter import PromptRewriter, clean_generation
from sur_lightning.toyworld.world import parse_toyworld, toyworld_accuracy
from sur_lightning.train import train

TEMPLATES = {
    "expand": [{"role": "system", "content": "Describe it."}, {"role": "user", "content": "{prompt}"}],
    "simplify": [{"role": "user", "content": "Shorten: {prompt}"}],
}
PROMPTS = ["two red circles", "a trio of tomatoes", "a pair of limes"]


def rewriter(tiny_llm, cache_file, **kwargs) -> PromptRewriter:
    return PromptRewriter(
        tiny_llm,
        kwargs.pop("templates", TEMPLATES),
        max_new_tokens=4,
        batch_size=2,
        cache_file=str(cache_file),
        device="cpu",
        **kwargs,
    )


def test_second_run_reads_the_cache_without_loading_the_llm(tiny_llm, tmp_path):
    first = rewriter(tiny_llm, tmp_path / "rewrites.jsonl")
    written = first.rewrite(PROMPTS + PROMPTS[:1])
    assert first.generated == 3 and len(written) == 4 and written[0] == written[3]
    lines = [json.loads(line) for line in (tmp_path / "rewrites.jsonl").read_text().splitlines()]
    assert {row["prompt"] for row in lines} == set(PROMPTS) and all(row["model"] == tiny_llm for row in lines)

    second = rewriter(tiny_llm, tmp_path / "rewrites.jsonl")
    assert second.rewrite(PROMPTS) == written[:3]
    assert second.generated == 0 and second.model is None  # the LLM was never loaded


def test_a_changed_template_or_decoding_invalidates_the_cache(tiny_llm, tmp_path):
    rewriter(tiny_llm, tmp_path / "r.jsonl").rewrite(PROMPTS)
    changed = {**TEMPLATES, "expand": [{"role": "user", "content": "Tell me more about {prompt}"}]}
    other_template = rewriter(tiny_llm, tmp_path / "r.jsonl", templates=changed)
    other_template.rewrite(PROMPTS)
    assert other_template.generated == 3
    longer = PromptRewriter(tiny_llm, TEMPLATES, max_new_tokens=5, cache_file=str(tmp_path / "r.jsonl"), device="cpu")
    longer.rewrite(PROMPTS)
    assert longer.generated == 3
    # The simplify task has its own template, so its own entries.
    simplify = rewriter(tiny_llm, tmp_path / "r.jsonl")
    simplify.rewrite(PROMPTS, task="simplify")
    assert simplify.generated == 3


def test_template_reaches_the_model_input_with_the_prompt(tiny_llm, tmp_path):
    r = rewriter(tiny_llm, tmp_path / "r.jsonl")
    r.load()
    text = r.model_input("a trio of tomatoes", "simplify")
    assert "Shorten: a trio of tomatoes" in text and "{prompt}" not in text


def test_unreadable_cache_lines_are_counted_and_their_prompts_rewritten(tiny_llm, tmp_path, capsys):
    cache = tmp_path / "r.jsonl"
    rewriter(tiny_llm, cache).rewrite(PROMPTS[:2])
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:10] + "\n")  # the second line cut by a killed writer
    again = rewriter(tiny_llm, cache)
    again.rewrite(PROMPTS[:2])
    assert again.generated == 1 and again.unreadable_lines == 1
    assert "1 unreadable line(s)" in capsys.readouterr().out


def test_other_ranks_wait_for_rank_zero_and_never_generate(tiny_llm, tmp_path):
    cache = tmp_path / "r.jsonl"
    reference = rewriter(tiny_llm, tmp_path / "elsewhere.jsonl").rewrite(PROMPTS)
    waiting = rewriter(tiny_llm, cache, poll_s=0.05)

    def rank_zero():
        time.sleep(0.3)
        cache.write_text((tmp_path / "elsewhere.jsonl").read_text())

    thread = threading.Thread(target=rank_zero)
    thread.start()
    assert waiting.rewrite(PROMPTS, rank=1) == reference
    thread.join()
    assert waiting.generated == 0 and waiting.model is None

    impatient = rewriter(tiny_llm, tmp_path / "never.jsonl", wait_timeout_s=0.0)
    with pytest.raises(TimeoutError, match="rewriter.wait_timeout_s"):
        impatient.rewrite(PROMPTS, rank=1)


def test_bad_templates_are_named():
    with pytest.raises(ValueError, match="must contain '{prompt}'"):
        PromptRewriter("x", {"expand": [{"role": "user", "content": "no placeholder"}]})
    with pytest.raises(ValueError, match="unknown task"):
        PromptRewriter("x", {"summarise": TEMPLATES["expand"]})


def test_clean_generation_keeps_the_first_line_without_quotes():
    assert clean_generation('  "three red circles"\nAnd more text') == "three red circles"
    assert clean_generation("\n\n  ") == ""


def test_toyworld_parse_names_count_colour_and_shape_or_none():
    assert parse_toyworld("Three red circles on a table.") == (3, "red", "circle")
    assert parse_toyworld("two red or green squares") == (2, None, "square")
    assert parse_toyworld("a tomato") == (None, None, None)
    accuracy = toyworld_accuracy(
        ["three red circles", "two blue squares"], [(3, "red", "circle"), (2, "red", "square")]
    )
    assert accuracy == {"count_named": 1.0, "color_named": 0.5, "shape_named": 1.0}


def test_rewrite_cli_prints_saves_and_scores_a_toyworld_suite(tiny_llm, tmp_path):
    from hydra import compose, initialize_config_dir

    from sur_lightning.rewrite import main
    from tests.conftest import CONFIG_DIR

    suite = tmp_path / "suite.jsonl"
    rows = [{"id": f"p{i}", "prompt": p, "count": 2, "color": "red", "shape": "circle"} for i, p in enumerate(PROMPTS)]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="rewrite",
            overrides=[
                f"prompts={suite}",
                f"rewriter.pretrained={tiny_llm}",
                "rewriter.max_new_tokens=3",
                f"paths.root_dir={tmp_path}",
                f"paths.cache_dir={tmp_path}/cache",
                f"out={tmp_path}/out/rewrites.jsonl",
            ],
        )
    summary = main.__wrapped__(cfg)
    assert summary["prompts"] == 3 and summary["generated"] == 3 and 0 <= summary["color_named"] <= 1
    saved = [json.loads(line) for line in (tmp_path / "out" / "rewrites.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in saved] == PROMPTS and saved[0]["target"] == [2, "red", "circle"]
    assert (tmp_path / "cache" / "rewrites.jsonl").exists()


# ---------------------------------------------------------------------------- in training


def test_prompt_alignment_both_is_the_mean_of_complex_and_rewrite_terms(backbone):
    from sur_lightning.models.connectors.sur import SURAdapter
    from sur_lightning.models.eta import FixedEta
    from sur_lightning.training.losses import DenoisingLoss, FeatureAlignmentLoss
    from sur_lightning.training.module import ConnectorTrainingModule

    def module(target):
        return ConnectorTrainingModule(
            backbone,
            SURAdapter(dim=backbone.cross_attention_dim, llm_dim=8, eta=FixedEta(0.1), num_heads=2, ff_dim=16),
            DenoisingLoss(),
            torch.optim.AdamW,
            prompt_loss=FeatureAlignmentLoss("mse", weight=1.0),
            align_target=target,
        )

    from sur_lightning.models.connectors import ConnectorOutput

    conditioning = ConnectorOutput(conditioning=torch.randn(2, 77, backbone.cross_attention_dim))
    batch = {"complex_prompt": ["two red circles", "one blue square"], "rewrite_prompt": ["three green squares", ""]}
    kept = [False, False]  # no caption dropped
    complex_term = module("complex").prompt_alignment(conditioning, batch, kept)["prompt"]
    rewrite_term = module("rewrite").prompt_alignment(conditioning, batch, kept)["prompt"]
    both = module("both").prompt_alignment(conditioning, batch, kept)
    assert not torch.allclose(complex_term, rewrite_term)
    torch.testing.assert_close(both["prompt"], (complex_term + rewrite_term) / 2)
    torch.testing.assert_close(both["prompt_rewrite"], rewrite_term)
    with pytest.raises(KeyError, match="rewrite_prompt"):
        module("rewrite").prompt_alignment(conditioning, {"complex_prompt": batch["complex_prompt"]}, kept)
    with pytest.raises(ValueError, match="align_target"):
        module("llm")


def test_training_aligns_to_cached_rewrites_and_caches_their_clip_states(compose, tiny_llm):
    cfg = compose(
        "loss=cosine",
        "loss.align_target=both",
        f"rewriter.pretrained={tiny_llm}",
        "rewriter.max_new_tokens=4",
        "data.cache=auto",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    )
    metrics = train(cfg)
    assert {"train/prompt_complex", "train/prompt_rewrite"} <= set(metrics)
    from conftest import open_cache
    from hydra.utils import instantiate

    cached = [json.loads(line) for line in Path(cfg.rewriter.cache_file).read_text().splitlines()]
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert sorted(row["prompt"] for row in cached) == sorted({row.simple for row in datamodule.all_rows()})
    rewrites = [row["rewrite"] for row in cached]
    from sur_lightning.data.datasets import content_hash

    cache = open_cache(cfg)
    assert all(cache.clip.key(content_hash(r)) in cache.clip for r in rewrites)


def test_simple_from_llm_writes_every_simple_prompt_from_the_complex_one(compose, tiny_llm):
    from hydra.utils import instantiate

    from sur_lightning.config import datamodule_arguments

    cfg = compose("data.simple_from=llm", f"rewriter.pretrained={tiny_llm}", "rewriter.max_new_tokens=4")
    arguments = datamodule_arguments(cfg)
    assert arguments["rewrite"] is False
    datamodule = instantiate(cfg.data, **arguments)
    datamodule.setup("fit")
    rows = datamodule.all_rows()
    expected = dict(
        zip([r.complex for r in rows], arguments["rewriter"].rewrite([r.complex for r in rows], task="simplify"))
    )
    assert all(row.simple == expected[row.complex] for row in rows)
    assert arguments["rewriter"].generated > 0


def test_no_rewriter_is_built_when_nothing_needs_one(compose):
    from sur_lightning.config import datamodule_arguments

    assert datamodule_arguments(compose("loss=cosine")) == {}
    assert datamodule_arguments(compose("loss=denoising", "loss.align_target=rewrite")) == {}
    with pytest.raises(ValueError, match="loss.align_target must be one of"):
        datamodule_arguments(compose("loss.align_target=llm"))
