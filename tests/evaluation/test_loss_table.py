"""experiments/loss_table/run.py: one row per pair with every encoder's losses, and a summary, in CSV and markdown."""

import csv

import pytest
import torch
from conftest import load_experiment_script


@pytest.fixture(scope="module")
def loss_table():
    return load_experiment_script("loss_table/run.py", "loss_table_run")


def test_the_script_writes_one_row_per_pair_with_every_loss(loss_table, tmp_path, llm):
    from sur_lightning.training.losses import FeatureAlignmentLoss

    pairs = loss_table.load_pairs()
    assert len(pairs) >= 30 and {p["kind"] for p in pairs} == set(loss_table.KINDS)
    three = [next(p for p in pairs if p["kind"] == kind) for kind in loss_table.KINDS]

    def tokens(prompts):  # a token-state encoder: the tiny LLM's states, padded to one length
        return llm.block_output(llm.tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt")).float()

    encoders = {"tiny": (loss_table.pooled(llm), False), "tinytok": (tokens, True)}
    rows = loss_table.main(three, encoders, similarity=loss_table.pooled(llm), out_dir=tmp_path)

    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    expected = [
        "kind",
        "change",
        "a",
        "b",
        "minilm_sim",
        "tiny_kl",
        "tiny_cosine",
        "tinytok_kl",
        "tinytok_cosine",
        "tinytok_cosine_tokens",
    ]
    assert list(written[0]) == expected and [r["kind"] for r in written] == list(loss_table.KINDS)
    assert [(r["a"], r["b"]) for r in written] == [(p["a"], p["b"]) for p in three]
    # The values are the project's losses on the pair's embeddings (a the student, b the teacher).
    a, b = loss_table.pooled(llm)([three[2]["a"]]), loss_table.pooled(llm)([three[2]["b"]])
    assert float(written[2]["tiny_kl"]) == pytest.approx(float(FeatureAlignmentLoss("kl")(a, b)), rel=1e-5)
    assert float(written[2]["tiny_cosine"]) == pytest.approx(
        1 - float(torch.cosine_similarity(a, b)), rel=1e-4, abs=1e-6
    )
    assert float(written[2]["minilm_sim"]) == pytest.approx(float(torch.cosine_similarity(a, b)), abs=1e-5)
    assert rows[0]["tinytok_cosine_tokens"] >= 0

    markdown = (tmp_path / "results.md").read_text()
    assert "| tiny_kl |" in markdown and "| tinytok_cosine_tokens |" in markdown and "Spearman" in markdown
    for p in three:
        assert markdown.count(f"| {p['kind']} | {p['change']} | {p['a']} | {p['b']} |") == 1
