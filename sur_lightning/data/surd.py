"""SURD as its authors publish it, and their precomputed LLM features.

SURD is a folder ``train/*.png`` + ``train/metadata.jsonl`` with ``file_name``, ``text`` (simple prompt)
and ``prompt`` (complex prompt), about 26k rows: ``data=surd data.root=/path/SURD/train`` reads it with
``ImageTextDataModule``. The authors also ship ``prompt2vec/{LLM}/{layer}.pt``: a dict from simple-prompt
string to an fp16 vector, the LLM's block output mean-pooled over tokens. ``llm=precomputed
llm.path=.../prompt2vec/llama13b/39.pt`` uses it in place of running the LLM.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class MissingPrecomputedFeature(KeyError):
    """A prompt has no vector in the prompt2vec file; the message names the prompt (and its row, when known)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class PrecomputedLLMFeatures(nn.Module):
    """Pooled LLM features looked up by prompt, with the call of ``CausalLMFeatures(pooling="mean")``.

    forward(list[str]) -> (states [B, D] float32, None)

    The file holds fp16 vectors, so the features equal ``CausalLMFeatures`` run in fp16 (or its float32
    output rounded to fp16). Nothing here is trained or saved in checkpoints.
    """

    pooling = "mean"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"llm.path={self.path} does not exist (expected prompt2vec/<LLM>/<layer>.pt)")
        table = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"llm.path={self.path} is not a non-empty dict of prompt -> vector")
        self.index = {prompt: i for i, prompt in enumerate(table)}
        # One [N, D] matrix on the CPU: rows are gathered per batch and only the batch moves to the device.
        self.vectors = torch.stack([torch.as_tensor(v).reshape(-1) for v in table.values()])
        # Tracks the module's device (the vectors stay on the CPU); not saved.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def missing_prompts(self, rows: list) -> list:
        """The rows (anything with ``.simple``) whose simple prompt has no vector."""
        return [row for row in rows if row.simple not in self.index]

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise MissingPrecomputedFeature(
                f"{len(missing)} prompt(s) have no precomputed LLM feature in {self.path}: {missing[:3]}. "
                "The file covers the dataset's simple prompts only; prompts for sample grids or evaluation "
                "need a real LLM (llm=llama13b ...) or a feature cache built with them."
            )
        rows = torch.tensor([self.index[p] for p in prompts])
        return self.vectors[rows].float().to(self.device), None


def write_prompt2vec(llm, prompts: list[str], path: str | Path, batch_size: int = 1) -> Path:
    """Write a prompt2vec file in the authors' format (prompt -> fp16 [D]) from a ``CausalLMFeatures``."""
    table = {}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        states, _ = llm(batch)
        table.update({p: s.half().cpu() for p, s in zip(batch, states)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(table, path)
    return path
