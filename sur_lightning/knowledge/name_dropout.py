"""Name dropout (``llm.rag.name_dropout``, ``NameDropout``): in training on the toy world the object
word alone predicts the image, so nothing teaches a connector to read the retrieved fact. With
probability p a training sample's object name is replaced by a nonsense placeholder word
(``PLACEHOLDER_WORDS``) in its prompt *and* in its retrieved fact, so only the fact says what to draw:

    "a pair of tomatoes"  ->  LLM input "A sukeb is a round red fruit, shaped like a circle.\na pair of sukebs"

The dataset draws which samples are renamed (``ImageTextDataset``, keyed by seed, epoch and row id) and
serves the renamed prompt; each caption has ``name_variants`` fixed renamed forms, so the feature cache
holds them all. The retriever undoes the renaming to retrieve (``NameDropout.invert``: the nonsense word
would retrieve nothing), then renames the fact it found. The names are a knowledge base's
"Name (plural)" titles (``name_lexicon``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from sur_lightning.knowledge.knowledge_base import KnowledgeBase

# Pronounceable nonsense words (consonant-vowel-consonant-vowel-consonant, ending in b/f/g/k/p so the
# plural is word + "s"), none of them a whole word of the CLIP vocabulary or a one- or two-token word for
# SmolLM2's tokenizer, none containing an object, colour or shape word; none occurs in any toy-world
# prompt or knowledge entry (tests/knowledge/test_name_dropout.py). The list and its order are part of the renaming
# scheme: the LLM cache's fingerprint hashes them (with p > 0), as it does NAME_DROPOUT_VERSION.
PLACEHOLDER_WORDS: tuple[str, ...] = (
    "sukeb",
    "vazik",
    "kulef",
    "dibeg",
    "tigeb",
    "kifop",
    "dozug",
    "guvuf",
    "zemok",
    "sifef",
    "nusuf",
    "fosig",
    "zasak",
    "lafob",
    "nizab",
    "mogep",
    "fipob",
    "zitof",
    "megef",
    "gupop",
    "vabap",
    "lopip",
    "nizuf",
    "katup",
    "tudaf",
    "vupob",
    "bamaf",
    "vopig",
    "tepog",
    "bivab",
    "vudeg",
    "kupog",
    "zogef",
    "zakaf",
    "ruseg",
    "nagik",
    "nelak",
    "lusek",
    "zonap",
    "fudef",
    "nufep",
    "sovib",
    "muvag",
    "nakip",
    "lorof",
    "fegip",
    "nokup",
    "zeseg",
    "zulip",
    "kebof",
    "tafif",
    "nilaf",
    "govug",
    "rukig",
    "davup",
    "todek",
    "vumob",
    "nalif",
    "pafib",
    "tosuf",
    "vaneb",
    "komaf",
    "dekup",
    "guvuk",
    "naluk",
    "mebak",
    "kedib",
    "dezik",
    "tavek",
    "kemig",
    "zapab",
    "tozuf",
    "pogik",
    "kumup",
    "debeb",
    "vemif",
    "ditip",
    "lozop",
    "zuvab",
    "lezef",
    "viduk",
    "zolob",
    "zakeb",
    "nakog",
    "rafuk",
    "gubep",
    "kibog",
    "furek",
    "pogek",
    "nisok",
    "mureb",
    "takab",
    "kofeb",
    "nopaf",
    "tosog",
    "zogak",
    "vukog",
    "mosef",
    "kabug",
    "fakub",
    "gedob",
    "rusug",
    "pemib",
    "kenab",
    "todof",
    "fepop",
    "rofag",
    "zalib",
    "vufuk",
    "bafob",
    "difob",
    "sefug",
    "gopak",
    "nafig",
    "fimup",
    "tovif",
    "zadog",
    "tebif",
    "zafuk",
    "gabog",
    "gukuf",
    "lubif",
    "zemip",
    "bofef",
    "kemip",
    "zolug",
    "bafag",
    "zarok",
    "fonob",
    "pusef",
    "pifaf",
    "bavak",
    "radub",
    "vamag",
    "mifof",
    "pugob",
    "tazub",
    "zamek",
    "vogof",
    "sibab",
    "sibak",
    "zodug",
    "bimob",
    "zarog",
    "kapab",
    "gasef",
    "bamob",
    "fivib",
    "bateb",
    "bevaf",
    "gidep",
    "zutuf",
    "vibog",
    "kipof",
    "tefub",
    "nubuf",
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
    invert(text) -> (original prompt, object index, placeholder, variant) of a renamed prompt, or None
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

    def invert(self, text: str) -> tuple[str, int, str, int] | None:
        """(original prompt, object index, placeholder, variant) when ``text`` is some prompt's renamed variant, else None."""
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
        return original, index, word, variant

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
