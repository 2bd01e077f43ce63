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

``bundled_knowledge_base("toyworld")`` is the knowledge base shipped in ``sur_lightning/knowledge/``:
one entry per toy-world object (its colour and shape in plain words) and a few real-world entries.

**Name dropout** (``llm.rag.name_dropout``, ``NameDropout``): in training on the toy world the object
word alone predicts the image, so nothing teaches a connector to read the retrieved fact. With
probability p a training sample's object name is replaced by a nonsense placeholder word
(``PLACEHOLDER_WORDS``) in its prompt *and* in its retrieved fact, so only the fact says what to draw:

    "a pair of tomatoes"  ->  LLM input "A sukeb is a round red fruit, shaped like a circle.\na pair of sukebs"

The dataset draws which samples are renamed (``ImageTextDataset``, keyed by seed, epoch and row id) and
serves the renamed prompt; each caption has ``name_variants`` fixed renamed forms, so the feature cache
holds them all. The retriever undoes the renaming to retrieve (``NameDropout.invert``: the nonsense word
would retrieve nothing), then renames the fact it found.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from sur_lightning.models.sentence import SentenceEncoderFeatures, minilm_path

KNOWLEDGE_DIR = Path(__file__).resolve().parent
# Facts first: a causal LM's prompt tokens can attend to the facts only if the facts come before them.
DEFAULT_TEMPLATE = "{facts}\n{prompt}"


def bundled_knowledge_base(name: str) -> str:
    """Path of ``sur_lightning/knowledge/<name>.jsonl`` (shipped with the package)."""
    path = KNOWLEDGE_DIR / f"{name}.jsonl"
    if not path.exists():
        available = sorted(p.stem for p in KNOWLEDGE_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no bundled knowledge base {name!r} in {KNOWLEDGE_DIR}; available: {available}")
    return str(path)


@dataclass(frozen=True)
class Passage:
    """One retrieved entry and its cosine similarity to the query."""

    title: str
    text: str
    score: float


class KnowledgeBase:
    """The entries of a JSONL knowledge base, in file order.

    A line that is not a JSON object with string ``title`` and ``text`` is an error naming the file and
    line. Blank lines are ignored; an entry with an empty text, or the same title and text as an earlier
    one (ignoring case and spacing), is skipped and counted (``skipped``: ``path:line: reason``).
    ``content_hash`` is the sha256 of the file's bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"knowledge base {self.path} does not exist")
        raw = self.path.read_bytes()
        self.content_hash = hashlib.sha256(raw).hexdigest()
        self.titles: list[str] = []
        self.texts: list[str] = []
        self.skipped: list[str] = []
        self.duplicates = 0
        seen = set()
        for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}): {line[:80]!r}") from None
            if not isinstance(row, dict) or not isinstance(row.get("title"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f'{where}: expected an object with string "title" and "text", got {line[:80]!r}')  # noqa: TRY004 - bad data, not a bad call
            title, text = row["title"].strip(), row["text"].strip()
            if not text:
                self.skipped.append(f"{where}: empty text")
                continue
            identity = (" ".join(title.lower().split()), " ".join(text.lower().split()))
            if identity in seen:
                self.duplicates += 1
                self.skipped.append(f"{where}: duplicate of an earlier entry {title!r}")
                continue
            seen.add(identity)
            self.titles.append(title)
            self.texts.append(text)
        if not self.texts:
            raise ValueError(f"knowledge base {self.path} has no entries")

    def __len__(self) -> int:
        return len(self.texts)

    def documents(self) -> list[str]:
        """What is embedded per entry: "title: text" (the title helps short queries that name the thing)."""
        return [f"{title}: {text}" for title, text in zip(self.titles, self.texts)]

    def summary(self) -> str:
        return f"{self.path.name}: {len(self)} entries, {len(self.skipped)} skipped ({self.duplicates} duplicates)"


# ------------------------------------------------------------------------------------------ name dropout

# Pronounceable nonsense words (consonant-vowel-consonant-vowel-consonant, ending in b/f/g/k/p so the
# plural is word + "s"), none of them a whole word of the CLIP vocabulary or a one- or two-token word for
# SmolLM2's tokenizer, none containing an object, colour or shape word; none occurs in any toy-world
# prompt or knowledge entry (tests/test_name_dropout.py). The list and its order are part of the renaming
# scheme: the LLM cache's fingerprint hashes them (with p > 0), as it does NAME_DROPOUT_VERSION.
PLACEHOLDER_WORDS: tuple[str, ...] = (
    "sukeb", "vazik", "kulef", "dibeg", "tigeb", "kifop", "dozug", "guvuf", "zemok", "sifef", "nusuf", "fosig",
    "zasak", "lafob", "nizab", "mogep", "fipob", "zitof", "megef", "gupop", "vabap", "lopip", "nizuf", "katup",
    "tudaf", "vupob", "bamaf", "vopig", "tepog", "bivab", "vudeg", "kupog", "zogef", "zakaf", "ruseg", "nagik",
    "nelak", "lusek", "zonap", "fudef", "nufep", "sovib", "muvag", "nakip", "lorof", "fegip", "nokup", "zeseg",
    "zulip", "kebof", "tafif", "nilaf", "govug", "rukig", "davup", "todek", "vumob", "nalif", "pafib", "tosuf",
    "vaneb", "komaf", "dekup", "guvuk", "naluk", "mebak", "kedib", "dezik", "tavek", "kemig", "zapab", "tozuf",
    "pogik", "kumup", "debeb", "vemif", "ditip", "lozop", "zuvab", "lezef", "viduk", "zolob", "zakeb", "nakog",
    "rafuk", "gubep", "kibog", "furek", "pogek", "nisok", "mureb", "takab", "kofeb", "nopaf", "tosog", "zogak",
    "vukog", "mosef", "kabug", "fakub", "gedob", "rusug", "pemib", "kenab", "todof", "fepop", "rofag", "zalib",
    "vufuk", "bafob", "difob", "sefug", "gopak", "nafig", "fimup", "tovif", "zadog", "tebif", "zafuk", "gabog",
    "gukuf", "lubif", "zemip", "bofef", "kemip", "zolug", "bafag", "zarok", "fonob", "pusef", "pifaf", "bavak",
    "radub", "vamag", "mifof", "pugob", "tazub", "zamek", "vogof", "sibab", "sibak", "zodug", "bimob", "zarog",
    "kapab", "gasef", "bamob", "fivib", "bateb", "bevaf", "gidep", "zutuf", "vibog", "kipof", "tefub", "nubuf",
    "bevip",
)
NAME_DROPOUT_VERSION = 1
# A name that is also a colour word ("orange") stays in a fact where it is the colour ("a round orange
# citrus fruit"): it is renamed only after a determiner ("An orange is ...") or as the plural.
COLOUR_WORDS = frozenset(
    {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gray"}
)
DETERMINERS = frozenset({"a", "an", "the", "one", "each", "every", "this", "that", "any", "some"})
_TITLE_WITH_PLURAL = re.compile(r"^(?P<singular>[^()]+?)\s*\((?P<plural>[^()]+)\)\s*$")
_MARK = "\x00"  # begins the slot markers of a skeleton; no prompt contains it


def name_lexicon(knowledge_base: KnowledgeBase) -> tuple[tuple[str, str], ...]:
    """(singular, plural), lower case, of every entry titled "Name (plural)": ``("tomato", "tomatoes")``.

    The toy-world knowledge base titles each object so (``sur_lightning.toyworld.world.OBJECTS``);
    entries without a plural ("Zebra") are never renamed.
    """
    names = []
    for title in knowledge_base.titles:
        match = _TITLE_WITH_PLURAL.match(title)
        if match:
            pair = (match["singular"].strip().lower(), match["plural"].strip().lower())
            if pair not in names:
                names.append(pair)
    return tuple(names)


def _word_pattern(forms: Sequence[str]) -> re.Pattern:
    """Whole-word, case-insensitive matches of ``forms``, longest first ("tomatoes" before "tomato")."""
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def _cased(word: str, like: str) -> str:
    """``word`` with ``like``'s leading capital."""
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


class NameDropout:
    """Renames an object in a prompt, and in a fact about it, to a placeholder word no prompt contains.

    names:    (singular, plural) of every renameable object (``name_lexicon`` of the knowledge base)
    variants: K, how many renamed forms each prompt has (variant k = 0..K-1)

    find(prompt) -> index of the one object the prompt names, or None (none, or several)
    variant(prompt, k) -> the prompt renamed by variant k, or None when it names no single object
    variants(prompt) -> its K renamed forms ([] when it names no single object)
    draw(prompt, rate, key) -> the prompt, or with probability ``rate`` one of its variants; keyed
    invert(text) -> (original prompt, object index, placeholder) of a renamed prompt, or None
    rename_fact(fact, index, placeholder) -> the fact with the object's name replaced (articles agree)

    Which word variant k of an object gets depends on the prompt's *skeleton* (the prompt with the name
    cut out, "a pair of _s on a table"): a keyed permutation of the words per skeleton gives object i's
    variant k the word at position k·N + i (N objects). Within one skeleton every (object, variant) has
    its own word, so a renamed prompt names its original exactly (``invert``: the cache key of a renamed
    prompt is its text, and the LLM retrieves with the original); across skeletons a word stands for
    different objects, so the word itself says nothing about the colour. Variant k's word does not
    depend on K, so raising K adds variants and keeps the others.

    In a prompt every whole-word occurrence of either form is replaced, case kept ("a pair of
    tomatoes" -> "a pair of sukebs"), so ``invert`` can undo it; in a fact "a"/"an" before the name
    agree with the placeholder, and a name that is also a colour word stays where it is the colour.
    """

    def __init__(
        self, names: Sequence[tuple[str, str]], variants: int = 4, words: Sequence[str] = PLACEHOLDER_WORDS
    ) -> None:
        self.names = tuple((singular.lower(), plural.lower()) for singular, plural in names)
        self.words = tuple(w.lower() for w in words)
        if not self.names:
            raise ValueError(
                "name dropout needs knowledge-base entries titled 'Name (plural)', e.g. 'Tomato (tomatoes)': "
                "this one has none"
            )
        if variants < 1:
            raise ValueError(f"rag.name_variants must be at least 1, got {variants}")
        if variants * len(self.names) > len(self.words):
            raise ValueError(
                f"rag.name_variants={variants} for {len(self.names)} objects needs {variants * len(self.names)} placeholder "
                f"words (one per object and variant), there are {len(self.words)}: at most "
                f"name_variants={len(self.words) // len(self.names)}"
            )
        if len(set(self.words)) != len(self.words):
            raise ValueError("the placeholder words must be distinct")
        self.variants = variants
        self._names = [_word_pattern(pair) for pair in self.names]
        self._words = _word_pattern([w + "s" for w in self.words] + list(self.words))
        self._word_index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def for_knowledge_base(cls, knowledge_base: str | Path | KnowledgeBase, variants: int = 4) -> NameDropout:
        kb = knowledge_base if isinstance(knowledge_base, KnowledgeBase) else KnowledgeBase(knowledge_base)
        return cls(name_lexicon(kb), variants)

    def fingerprint(self) -> dict:
        """What renamed prompts and facts depend on (not the rate, not K: variant k is the same for any K)."""
        words = hashlib.sha256(",".join(self.words).encode()).hexdigest()[:16]
        return {"version": NAME_DROPOUT_VERSION, "words": words, "names": [list(pair) for pair in self.names]}

    # ------------------------------------------------------------------ renaming a prompt

    def find(self, prompt: str) -> int | None:
        found = [i for i, pattern in enumerate(self._names) if pattern.search(prompt)]
        return found[0] if len(found) == 1 else None

    def _skeleton(self, text: str, pattern: re.Pattern, is_plural) -> str:
        """``text`` with each match of ``pattern`` replaced by a marker of its form and leading capital."""
        return pattern.sub(lambda m: f"{_MARK}{'P' if is_plural(m[0]) else 'S'}{int(m[0][:1].isupper())}{_MARK}", text)

    def skeleton(self, prompt: str, index: int) -> str:
        plural = self.names[index][1]
        return self._skeleton(prompt, self._names[index], lambda found: found.lower() == plural)

    @staticmethod
    @lru_cache(maxsize=4096)
    def _order(skeleton: str, count: int) -> tuple[int, ...]:
        order = list(range(count))
        random.Random(f"name-dropout:v{NAME_DROPOUT_VERSION}:{skeleton}").shuffle(order)
        return tuple(order)

    def placeholder(self, skeleton: str, index: int, variant: int) -> str:
        if not 0 <= variant < self.variants:
            raise ValueError(f"variant {variant} is outside 0..{self.variants - 1}")
        return self.words[self._order(skeleton, len(self.words))[variant * len(self.names) + index]]

    @staticmethod
    def _fill(skeleton: str, singular: str, plural: str) -> str:
        def form(match: re.Match) -> str:
            word = plural if match[1] == "P" else singular
            return _cased(word, "A" if match[2] == "1" else "a")

        return re.sub(f"{_MARK}([SP])([01]){_MARK}", form, skeleton)

    def variant(self, prompt: str, variant: int) -> str | None:
        index = self.find(prompt)
        if index is None:
            return None
        skeleton = self.skeleton(prompt, index)
        word = self.placeholder(skeleton, index, variant)
        return self._fill(skeleton, word, word + "s")

    def all_variants(self, prompt: str) -> list[str]:
        """The K renamed forms of ``prompt``; [] when it names no single object."""
        if self.find(prompt) is None:
            return []
        return [self.variant(prompt, k) for k in range(self.variants)]

    def draw(self, prompt: str, rate: float, key: str) -> str:
        """``prompt`` or, with probability ``rate``, its variant k (k uniform), both drawn from a generator
        seeded by ``key`` alone: the same key gives the same answer in any process, worker or resumed run."""
        rng = random.Random(f"name-dropout:{key}")
        renamed, variant = rng.random() < rate, rng.randrange(self.variants)
        return (self.variant(prompt, variant) or prompt) if renamed else prompt

    # ------------------------------------------------------------------ undoing it, and the fact

    def placeholders_in(self, text: str) -> set[str]:
        """The placeholder words (singular form) that occur in ``text``."""
        return {self._singular(m[0].lower()) for m in self._words.finditer(text)}

    def _singular(self, found: str) -> str:
        return found if found in self._word_index else found[:-1]

    def invert(self, text: str) -> tuple[str, int, str] | None:
        """(original prompt, object index, placeholder) when ``text`` is some prompt's renamed variant, else None."""
        placeholders = self.placeholders_in(text)
        if len(placeholders) != 1:
            return None
        (word,) = placeholders
        skeleton = self._skeleton(text, self._words, lambda found: found.lower() == word + "s")
        position = self._order(skeleton, len(self.words)).index(self._word_index[word])
        variant, index = divmod(position, len(self.names))
        if variant >= self.variants:
            return None
        original = self._fill(skeleton, *self.names[index])
        # The original must name this object alone and rename back to exactly this text.
        if self.find(original) != index or self.variant(original, variant) != text:
            return None
        return original, index, word

    def rename_fact(self, fact: str, index: int, word: str) -> str:
        """``fact`` with object ``index``'s name replaced by ``word`` (plural: word + "s"); "a"/"an" just
        before it agree with the word; a singular that is a colour word and follows no determiner stays."""
        singular, plural = self.names[index]
        out, last = [], 0
        for match in self._names[index].finditer(fact):
            found = match[0]
            is_plural = found.lower() == plural
            before = fact[last : match.start()]
            previous = re.search(r"([A-Za-z]+)[ \t]+$", fact[: match.start()])
            if not is_plural and singular in COLOUR_WORDS and previous and previous[1].lower() not in DETERMINERS:
                continue  # the colour, not the object: "a round orange citrus fruit"
            new = _cased(word + ("s" if is_plural else ""), found)
            article = re.search(r"(?<![\w-])(an?)(\s+)$", before, re.IGNORECASE)
            if article:
                agreed = "an" if new[0].lower() in "aeiou" else "a"
                before = before[: article.start()] + _cased(agreed, article[1]) + article[2]
            out += [before, new]
            last = match.end()
        out.append(fact[last:])
        return "".join(out)


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
    ) -> None:
        if top_k < 1:
            raise ValueError(f"rag.top_k must be at least 1, got {top_k}")
        if "{facts}" not in template or "{prompt}" not in template:
            raise ValueError(f"rag.template must contain {{facts}} and {{prompt}}, got {template!r}")
        if template.index("{facts}") > template.index("{prompt}"):
            # The LLM is causal: facts placed after the prompt cannot change the prompt's token states.
            raise ValueError(f"rag.template must put {{facts}} before {{prompt}}, got {template!r}")
        self.knowledge_base = knowledge_base if isinstance(knowledge_base, KnowledgeBase) else KnowledgeBase(knowledge_base)
        if not 0.0 <= float(name_dropout) <= 1.0:
            raise ValueError(f"rag.name_dropout is a probability in [0, 1], got {name_dropout}")
        self.name_dropout = float(name_dropout)
        # Only with name dropout on does a renamed prompt mean anything here.
        self.renamer = NameDropout(name_lexicon(self.knowledge_base), name_variants) if self.name_dropout > 0 else None
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

        return {"pretrained": self.encoder_path, "files": files_hash(self.encoder_path), "max_length": self.encoder_max_length}

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
        }

    # ------------------------------------------------------------------ index

    @property
    def encoder(self) -> SentenceEncoderFeatures:
        if self._encoder is None:
            self._encoder = SentenceEncoderFeatures(self.encoder_path, pooling="mean", max_length=self.encoder_max_length)
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
            [Passage(kb.titles[j], kb.texts[j], float(s)) for s, j in zip(row_scores.tolist(), row_index.tolist()) if s >= self.threshold]
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
        prompts = list(prompts)
        queries, renamed = self.undo_renaming(prompts)
        spans = []
        for prompt, rename, passages in zip(prompts, renamed, self.retrieve(queries)):
            if rename is not None:
                passages = [Passage(p.title, self.renamer.rename_fact(p.text, *rename), p.score) for p in passages]
            spans.append(self.fill(prompt, passages))
        return spans

    def undo_renaming(self, prompts: list[str]) -> tuple[list[str], list[tuple[int, str] | None]]:
        """The prompts to retrieve with (a renamed one's original) and, per prompt, (object index,
        placeholder) when it was renamed; without name dropout the prompts themselves and no renaming."""
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
