"""Retrieval-augmented prompts: facts from a local knowledge base, put in front of the prompt the LLM reads.

    knowledge base   a JSONL file, one ``{"title": ..., "text": ...}`` a line (``KnowledgeBase``)
    index            every entry's sentence embedding ("title: text"), [N, D], L2-normalised, computed
                     once and stored in ``index_dir/<key>/`` (``embeddings.safetensors`` + ``index.json``);
                     the key hashes the knowledge base's bytes and the encoder's identity (path, settings,
                     the size and mtime of its files), so it is rebuilt exactly when either changes
    retrieve         cosine similarity of the prompt's embedding to every entry: the ``top_k`` best
                     that reach ``threshold``
    augment          ``template`` filled with the retrieved texts (``{facts}``) and the prompt
                     (``{prompt}``); a prompt with no fact above the threshold is returned unchanged

The default encoder is all-MiniLM-L6-v2 (``sur_lightning.models.sentence``); any Hugging Face encoder works by
hub id or folder (``encoder=...``), or a ready ``SentenceEncoderFeatures``. It is loaded on first use,
so building a ``Retriever`` for its ``fingerprint`` (the feature cache does) costs no model load.

The knowledge bases: ``knowledge_base.py``. With ``name_dropout`` > 0 (training on the toy world) the retriever
undoes a prompt's renaming to retrieve and renames the fact it found (``name_dropout.py``); with ``vary_wording``
it reads renamed variant k's fact in the entry's wording k mod W (``KnowledgeBase.wordings``), so that across a
training object's variants the colour and shape words stand in different sentences.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from sur_lightning.knowledge.knowledge_base import KnowledgeBase, Passage
from sur_lightning.knowledge.name_dropout import NameDropout, name_lexicon
from sur_lightning.models.sentence import SentenceEncoderFeatures, minilm_path

# Facts first: a causal LM's prompt tokens can attend to the facts only if the facts come before them.
DEFAULT_TEMPLATE = "{facts}\n{prompt}"


class Retriever:
    """Top-k cosine retrieval over a knowledge base with a frozen sentence encoder.

    retrieve(prompts: list[str]) -> list[list[Passage]]   per prompt, at most ``top_k``, best first, score ≥ threshold
    augment(prompts: list[str]) -> list[str]               the template-filled LLM inputs
    augment_spans(prompts) -> list[tuple[str, int]]         the same, each with the character offset of the prompt in it
    fingerprint() -> dict                                  what the outputs depend on, for cache keys

    ``name_dropout`` (the probability p that a training sample's object is renamed; the dataset draws it)
    and ``name_variants`` (K renamed forms per caption), see ``NameDropout``. With p > 0 this retriever
    reads a renamed prompt ("a pair of sukebs") as its original would be read with the name renamed:
    it retrieves with the original prompt and renames the object in the facts it finds. A prompt with a
    placeholder word that is no renamed variant is an error (the data and the LLM disagree on K or the
    knowledge base). With p = 0 (the default) nothing is renamed or undone, and the fingerprint is the
    one it had before name dropout existed.

    ``vary_wording``: a renamed prompt's variant k reads its fact in the entry's wording k mod W, so an
    object's K variants read its fact in up to W different sentences and only the colour and shape words
    stay the same; variant 0 (what ``anonymise`` reads at inference) and an unrenamed prompt read the
    entry's ``text``. Entries without wordings read their text in every variant.

    ``anonymise``: every prompt that names a knowledge-base object is read as its renamed variant 0, in
    training and at inference, prompt and fact alike, so the object's name serves retrieval only and the
    LLM reads a nonsense word where the name was. A connector trained with name dropout p = 1 then reads
    at inference what it read in training.

    ``variant_mean``: how generation reads a connector trained on this retriever's renamed prompts: as the mean
    of its outputs over each prompt's K renamed variants (``VariantMeanConditioning``), not variant 0 alone.
    The retriever itself reads one prompt at a time either way.
    """

    def __init__(
        self,
        knowledge_base: str | Path | KnowledgeBase,
        encoder: str | SentenceEncoderFeatures | None = None,
        top_k: int = 1,
        threshold: float = 0.4,
        index_dir: str | Path | None = None,
        template: str = DEFAULT_TEMPLATE,
        separator: str = " ",
        name_dropout: float = 0.0,
        name_variants: int = 4,
        anonymise: bool = False,
        vary_wording: bool = False,
        variant_mean: bool = False,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"rag.top_k must be at least 1, got {top_k}")
        if "{facts}" not in template or "{prompt}" not in template:
            raise ValueError(f"rag.template must contain {{facts}} and {{prompt}}, got {template!r}")
        if template.index("{facts}") > template.index("{prompt}"):
            # The LLM is causal: facts placed after the prompt cannot change the prompt's token states.
            raise ValueError(f"rag.template must put {{facts}} before {{prompt}}, got {template!r}")
        self.knowledge_base = (
            knowledge_base if isinstance(knowledge_base, KnowledgeBase) else KnowledgeBase(knowledge_base)
        )
        if not 0.0 <= float(name_dropout) <= 1.0:
            raise ValueError(f"rag.name_dropout is a probability in [0, 1], got {name_dropout}")
        self.name_dropout = float(name_dropout)
        self.anonymise = bool(anonymise)
        self.vary_wording = bool(vary_wording)
        # Only with name dropout or anonymising on does a renamed prompt mean anything here.
        renames = self.name_dropout > 0 or self.anonymise
        if self.vary_wording and not renames:
            # The wording follows the renamed variant: without renaming every prompt would read the text.
            raise ValueError("rag.vary_wording needs name dropout (rag.name_dropout > 0) or rag.anonymise")
        if variant_mean and not renames:
            raise ValueError("rag.variant_mean needs name dropout (rag.name_dropout > 0) or rag.anonymise")
        # Read by generation only (generation/columns.py): the LLM's states, and so the fingerprint, do not change.
        self.variant_mean = bool(variant_mean)
        self.renamer = NameDropout(name_lexicon(self.knowledge_base), name_variants) if renames else None
        if isinstance(encoder, SentenceEncoderFeatures):
            if encoder.pooling != "mean":
                raise ValueError(f"the retriever's encoder must pool (pooling='mean'), got pooling={encoder.pooling!r}")
            self._encoder, self.encoder_path, self.encoder_max_length = encoder, encoder.pretrained, encoder.max_length
        else:
            # Loaded on first use: a retriever built only for its fingerprint loads no model.
            self._encoder, self.encoder_path, self.encoder_max_length = None, str(encoder or minilm_path()), 256
        self.top_k = top_k
        self.threshold = threshold
        self.index_dir = Path(index_dir) if index_dir else None
        self.template = template
        self.separator = separator
        self._embeddings: torch.Tensor | None = None
        self.built_index = False  # True once this retriever computed (rather than loaded) the embeddings

    # ------------------------------------------------------------------ identity

    def encoder_identity(self) -> dict:
        """The encoder's path, settings and a hash of its files' names, sizes and mtimes (None for a hub id)."""
        from sur_lightning.models.backbone import files_hash

        return {
            "pretrained": self.encoder_path,
            "files": files_hash(self.encoder_path),
            "max_length": self.encoder_max_length,
        }

    def index_key(self) -> str:
        identity = {"knowledge_base": self.knowledge_base.content_hash, "encoder": self.encoder_identity()}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint(self) -> dict:
        """Everything the augmented inputs depend on: the knowledge base, the encoder, top-k, threshold, template."""
        return {
            "knowledge_base": self.knowledge_base.content_hash,
            "encoder": self.encoder_identity(),
            "top_k": self.top_k,
            "threshold": self.threshold,
            "template": self.template,
            "separator": self.separator,
            # Only with name dropout on, so every fingerprint made without it stays as it was.
            **({"name_dropout": self.renamer.fingerprint()} if self.renamer is not None else {}),
            **({"anonymise": True} if self.anonymise else {}),
            **({"vary_wording": True} if self.vary_wording else {}),
        }

    # ------------------------------------------------------------------ index

    @property
    def encoder(self) -> SentenceEncoderFeatures:
        if self._encoder is None:
            self._encoder = SentenceEncoderFeatures(
                self.encoder_path, pooling="mean", max_length=self.encoder_max_length
            )
        return self._encoder

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[N, D] L2-normalised embeddings (normalised here too, so any encoder gives cosine similarity)."""
        chunks = [self.encoder(texts[i : i + batch_size])[0] for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    @property
    def embeddings(self) -> torch.Tensor:
        """[N, D] the knowledge base's embeddings: loaded from ``index_dir`` when its key matches, else computed (and stored)."""
        if self._embeddings is None:
            self._embeddings = self.load_index()
            if self._embeddings is None:
                self._embeddings = self.embed(self.knowledge_base.documents())
                self.built_index = True
                self.save_index(self._embeddings)
                print(f"RAG index built: {self.knowledge_base.summary()}, encoder {self.encoder_path}", flush=True)
        return self._embeddings

    def index_folder(self) -> Path | None:
        return self.index_dir / self.index_key() if self.index_dir else None

    def load_index(self) -> torch.Tensor | None:
        folder = self.index_folder()
        if folder is None or not (folder / "index.json").exists() or not (folder / "embeddings.safetensors").exists():
            return None
        from safetensors.torch import load_file

        meta = json.loads((folder / "index.json").read_text())
        if meta.get("titles") != self.knowledge_base.titles:  # a foreign or stale folder under the same key
            return None
        return load_file(str(folder / "embeddings.safetensors"))["embeddings"]

    def save_index(self, embeddings: torch.Tensor) -> None:
        folder = self.index_folder()
        if folder is None:
            return
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        # Written under temporary names and renamed, so a killed build leaves nothing a reader accepts.
        tmp = folder / f".embeddings-{os.getpid()}.tmp"
        save_file({"embeddings": embeddings.contiguous()}, str(tmp))
        os.replace(tmp, folder / "embeddings.safetensors")
        meta = {
            "knowledge_base": str(self.knowledge_base.path),
            "knowledge_base_sha256": self.knowledge_base.content_hash,
            "encoder": self.encoder_identity(),
            "entries": len(self.knowledge_base),
            "skipped": self.knowledge_base.skipped,
            "titles": self.knowledge_base.titles,
        }
        tmp = folder / f".index-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / "index.json")

    # ------------------------------------------------------------------ queries

    def retrieve(self, prompts: list[str]) -> list[list[Passage]]:
        """Per prompt, the ``top_k`` most similar entries whose cosine similarity is at least ``threshold``."""
        prompts = list(prompts)
        if not prompts:
            return []
        scores = self.embed(prompts) @ self.embeddings.T  # [B, N]
        best, index = scores.topk(min(self.top_k, scores.shape[1]), dim=-1)
        kb = self.knowledge_base
        return [
            [
                Passage(kb.titles[j], kb.texts[j], float(s), kb.wordings[j])
                for s, j in zip(row_scores.tolist(), row_index.tolist())
                if s >= self.threshold
            ]
            for row_scores, row_index in zip(best, index)
        ]

    def fill(self, prompt: str, passages: list[Passage]) -> tuple[str, int]:
        """The template filled with ``passages`` and ``prompt``, and where the prompt starts in it; the bare prompt without passages."""
        if not passages:
            return prompt, 0
        facts = self.separator.join(p.text for p in passages)
        before, after = self.template.split("{prompt}", 1)
        head = before.replace("{facts}", facts)  # str.replace, not format: a template may hold other braces
        return head + prompt + after, len(head)

    def augment_spans(self, prompts: list[str]) -> list[tuple[str, int]]:
        prompts = [self.anonymised(p) for p in prompts] if self.anonymise else list(prompts)
        queries, renamed = self.undo_renaming(prompts)
        spans = []
        for prompt, rename, passages in zip(prompts, renamed, self.retrieve(queries)):
            if rename is not None:
                index, word, variant = rename
                passages = [
                    Passage(p.title, self.renamer.rename_fact(self.wording(p, variant), index, word), p.score)
                    for p in passages
                ]
            spans.append(self.fill(prompt, passages))
        return spans

    def wording(self, passage: Passage, variant: int) -> str:
        """The sentence renamed variant ``variant`` reads: wording variant mod W with ``vary_wording``, else the text."""
        if not self.vary_wording or not passage.wordings:
            return passage.text
        return passage.wordings[variant % len(passage.wordings)]

    def anonymised(self, prompt: str) -> str:
        """``prompt`` with its object renamed (variant 0); unchanged when it names none or is renamed already."""
        if self.renamer.placeholders_in(prompt):
            return prompt
        return self.renamer.variant(prompt, 0) or prompt

    def undo_renaming(self, prompts: list[str]) -> tuple[list[str], list[tuple[int, str, int] | None]]:
        """The prompts to retrieve with (a renamed one's original) and, per prompt, (object index,
        placeholder, variant) when it was renamed; without name dropout the prompts themselves and no renaming."""
        if self.renamer is None:
            return prompts, [None] * len(prompts)
        queries, renamed = [], []
        for prompt in prompts:
            inverted = self.renamer.invert(prompt)
            if inverted is None and self.renamer.placeholders_in(prompt):
                raise ValueError(
                    f"{prompt[:80]!r} holds a name-dropout placeholder but is no renamed variant of a prompt for "
                    f"this retriever (rag.name_variants={self.renamer.variants}, knowledge base "
                    f"{self.knowledge_base.path.name}): data.name_variants and data.name_knowledge_base must be "
                    "llm.rag's (conf/data/*.yaml take them from llm.rag)"
                )
            queries.append(prompt if inverted is None else inverted[0])
            renamed.append(None if inverted is None else inverted[1:])
        return queries, renamed

    def augment(self, prompts: list[str]) -> list[str]:
        """The LLM inputs: each prompt with its retrieved facts in the template (unchanged when none reach the threshold)."""
        return [text for text, _ in self.augment_spans(prompts)]
