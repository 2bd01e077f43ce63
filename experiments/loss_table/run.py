"""Does SUR's KL "distillation" loss tell meanings apart? Cosine and KL between sentence embeddings, ranked against MiniLM.

For each hand-written sentence pair in ``pairs.jsonl`` (paraphrases, near-misses that change one
attribute — colour, count, shape, object — and unrelated pairs), both sentences are encoded by each text
encoder and the project's own alignment losses (``sur_lightning.training.losses.FeatureAlignmentLoss``) are
computed between the two embeddings, sentence a as the student and b as the teacher:

    kl             SUR's official loss, KL over a softmax of the feature axis (τ = 1), summed over tokens
    cosine         1 − cos of the token means
    cosine_tokens  1 − cos per token, averaged (token-state encoders only)

Each encoder gives the representation SUR aligns: a CLIP text encoder its [77, d] last hidden states
padded to 77 tokens (what L_prompt compares), SmolLM2 its last block's output mean-pooled over tokens
(the [576] state L_llm distils). The reference for "same meaning" is all-MiniLM-L6-v2's cosine
similarity. A loss that separates meaning should fall as MiniLM similarity rises (Spearman ρ near −1)
and be clearly larger on unrelated and near-miss pairs than on paraphrases.

    python experiments/loss_table/run.py                         # toy-world CLIP + SmolLM2, offline
    python experiments/loss_table/run.py --clip-l /path/to/clip-vit-large-patch14   # adds CLIP ViT-L/14

Writes ``results.csv`` (one row per pair) and ``results.md`` (the table and a summary: Spearman ρ of each
loss against MiniLM similarity, the mean loss per pair kind, and each loss's separation in units of its
own standard deviation over all pairs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sur_lightning.training.losses import FeatureAlignmentLoss

HERE = Path(__file__).resolve().parent
KINDS = ("paraphrase", "near_miss", "unrelated")
# An encoder: prompts -> [B, N, d] token states (True) or [B, d] pooled states (False).
Encoder = tuple[Callable[[list[str]], torch.Tensor], bool]


def load_pairs(path: str | Path = HERE / "pairs.jsonl") -> list[dict]:
    """Rows ``{kind, change, a, b}``; ``kind`` is one of KINDS."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if row.get("kind") not in KINDS or not row.get("a") or not row.get("b"):
                raise ValueError(f"{path}:{number}: expected kind in {KINDS} and sentences a, b; got {line!r}")
            pairs.append(row)
    return pairs


# ------------------------------------------------------------------------------------- encoders


class ClipTokenStates:
    """A CLIP text encoder's last hidden states, padded to 77 tokens as Stable Diffusion reads them: [B, 77, d].

    ``folder`` holds ``text_encoder/`` and ``tokenizer/`` (an SD checkpoint, the toy-world base) or is a
    CLIP text model folder with its tokenizer files (openai/clip-vit-large-patch14).
    """

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer, CLIPTextModel

        folder = Path(folder)
        model_dir = folder / "text_encoder" if (folder / "text_encoder").exists() else folder
        tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").exists() else folder
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = CLIPTextModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return self.model(ids).last_hidden_state.float()


def pooled(features) -> Callable[[list[str]], torch.Tensor]:
    """[B, D] from a ``CausalLMFeatures``/``SentenceEncoderFeatures`` with ``pooling="mean"``."""
    return lambda prompts: features(prompts)[0].float()


def default_encoders(cache_dir: Path, clip_l: str | None) -> dict[str, Encoder]:
    from sur_lightning.models.llm import CausalLMFeatures, convert_smollm2_gguf

    encoders: dict[str, Encoder] = {
        "toyclip": (ClipTokenStates(ROOT / "sur_lightning" / "toyworld" / "base"), True),
        "smollm2": (pooled(CausalLMFeatures(convert_smollm2_gguf(cache_dir / "smollm2-135m-instruct"))), False),
    }
    if clip_l and Path(clip_l).exists():
        encoders["clip_l14"] = (ClipTokenStates(clip_l), True)
    else:
        print(
            "note: CLIP ViT-L/14 skipped: its weights are not available offline; pass --clip-l with a local "
            "openai/clip-vit-large-patch14 folder (or an SD1.5 folder) to add it.",
            flush=True,
        )
    return encoders


# ------------------------------------------------------------------------------------- the study


LOSSES = {
    "kl": FeatureAlignmentLoss("kl", temperature=1.0),
    "cosine": FeatureAlignmentLoss("cosine", pooling="mean"),
    "cosine_tokens": FeatureAlignmentLoss("cosine", pooling="tokens"),
}


def pair_losses(a: torch.Tensor, b: torch.Tensor, token_states: bool) -> dict[str, float]:
    """The losses between one pair's embeddings (a: student, b: teacher), each [1, N, d] or [1, d]."""
    names = ("kl", "cosine", "cosine_tokens") if token_states else ("kl", "cosine")
    return {name: float(LOSSES[name](a, b)) for name in names}


def measure(
    pairs: list[dict], encoders: dict[str, Encoder], similarity: Callable[[list[str]], torch.Tensor]
) -> list[dict]:
    """One row per pair: kind, change, a, b, minilm_sim and ``<encoder>_<loss>`` for every encoder and loss."""
    first, second = [p["a"] for p in pairs], [p["b"] for p in pairs]
    ref_a, ref_b = (
        torch.nn.functional.normalize(similarity(first), dim=-1),
        torch.nn.functional.normalize(similarity(second), dim=-1),
    )
    rows = [
        {"kind": p["kind"], "change": p["change"], "a": p["a"], "b": p["b"], "minilm_sim": float(ref_a[i] @ ref_b[i])}
        for i, p in enumerate(pairs)
    ]
    for name, (encode, token_states) in encoders.items():
        states_a, states_b = encode(first), encode(second)
        for i, row in enumerate(rows):
            for loss, value in pair_losses(states_a[i : i + 1], states_b[i : i + 1], token_states).items():
                row[f"{name}_{loss}"] = value
    return rows


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per loss column: Spearman ρ against MiniLM similarity, the mean per pair kind, and the separations
    (unrelated − paraphrase, near-miss − paraphrase) in units of the column's standard deviation over all pairs."""
    from scipy.stats import spearmanr

    columns = [c for c in rows[0] if c not in ("kind", "change", "a", "b", "minilm_sim")]
    sims = [r["minilm_sim"] for r in rows]
    summary = {}
    for column in ["minilm_sim", *columns]:
        values = torch.tensor([r[column] for r in rows], dtype=torch.float64)
        means = {
            k: float(values[[r["kind"] == k for r in rows]].mean()) for k in KINDS if any(r["kind"] == k for r in rows)
        }
        std = float(values.std()) if len(values) > 1 else float("nan")
        summary[column] = {
            "spearman": float(spearmanr(values.tolist(), sims).statistic) if column != "minilm_sim" else 1.0,
            "means": means,
            "sep_unrelated": (means.get("unrelated", float("nan")) - means.get("paraphrase", float("nan"))) / std,
            "sep_near_miss": (means.get("near_miss", float("nan")) - means.get("paraphrase", float("nan"))) / std,
        }
    return summary


def number(x: float) -> str:
    return f"{x:.4g}"


def write_results(rows: list[dict], summary: dict[str, dict], out_dir: Path, note: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(rows[0])
    lines = ["# Loss table: cosine vs SUR's KL between sentence embeddings", ""]
    if note:
        lines += [note, ""]
    lines += [
        "## Summary",
        "",
        "Spearman ρ against MiniLM similarity (a loss that tracks meaning: near −1); mean per pair kind;",
        "separation = (mean on unrelated or near-miss pairs − mean on paraphrases) / the column's std over all pairs.",
        "",
    ]
    lines += [
        "| column | Spearman ρ | paraphrase | near_miss | unrelated | sep. unrelated | sep. near-miss |",
        "|---|---|---|---|---|---|---|",
    ]
    for column, s in summary.items():
        means = [number(s["means"].get(k, float("nan"))) for k in KINDS]
        lines.append(
            f"| {column} | {s['spearman']:+.3f} | {' | '.join(means)} | {s['sep_unrelated']:+.2f} | {s['sep_near_miss']:+.2f} |"
        )
    lines += ["", "## Pairs", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(number(v) if isinstance(v, float) else str(v) for v in row.values()) + " |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def main(
    pairs: list[dict] | None = None,
    encoders: dict[str, Encoder] | None = None,
    similarity: Callable[[list[str]], torch.Tensor] | None = None,
    out_dir: str | Path = HERE,
    cache_dir: str | Path | None = None,
    clip_l: str | None = None,
) -> list[dict]:
    """Measure every pair with every encoder, write ``results.csv`` and ``results.md`` into ``out_dir``; return the rows."""
    from sur_lightning.models.sentence import SentenceEncoderFeatures

    torch.manual_seed(0)
    pairs = load_pairs() if pairs is None else pairs
    cache_dir = Path(cache_dir or os.environ.get("SUR_LIGHTNING_CACHE") or ROOT / ".cache")
    encoders = default_encoders(cache_dir, clip_l) if encoders is None else encoders
    similarity = pooled(SentenceEncoderFeatures()) if similarity is None else similarity
    rows = measure(pairs, encoders, similarity)
    summary = summarise(rows)
    note = (
        ""
        if "clip_l14" in encoders
        else "CLIP ViT-L/14: not measured (its weights are not available offline; `--clip-l PATH` adds it)."
    )
    write_results(rows, summary, Path(out_dir), note)
    for column, s in summary.items():
        print(
            f"{column:22s} spearman {s['spearman']:+.3f}  sep_unrelated {s['sep_unrelated']:+.2f}  sep_near_miss {s['sep_near_miss']:+.2f}  "
            + "  ".join(f"{k} {number(v)}" for k, v in s["means"].items())
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(HERE / "pairs.jsonl"))
    parser.add_argument("--out", default=str(HERE), help="folder for results.csv and results.md")
    parser.add_argument(
        "--cache-dir", default=None, help="where SmolLM2 is converted once (default: $SUR_LIGHTNING_CACHE or ./.cache)"
    )
    parser.add_argument(
        "--clip-l", default=None, help="a local CLIP ViT-L/14 (openai/clip-vit-large-patch14 or SD1.5) folder"
    )
    args = parser.parse_args()
    main(load_pairs(args.pairs), out_dir=args.out, cache_dir=args.cache_dir, clip_l=args.clip_l)
