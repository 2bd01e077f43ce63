"""Knowledge bases: local JSONL files of facts, one ``{"title": ..., "text": ...}`` a line (``KnowledgeBase``).

An entry may add ``"wordings": [...]``: other sentences that say the same fact. Retrieval embeds only the
``text``; a retriever with ``vary_wording`` on reads a renamed training sample's fact in one of them.

``bundled_knowledge_base("toyworld")`` is the knowledge base shipped in ``sur_lightning/knowledge/``:
one entry per toy-world object (its colour and shape in plain words) and a few real-world entries.
The retriever (``rag.py``) embeds and searches them; name dropout (``name_dropout.py``) reads their titles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

KNOWLEDGE_DIR = Path(__file__).resolve().parent


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
    wordings: tuple[str, ...] = ()  # the entry's text, then its other wordings


class KnowledgeBase:
    """The entries of a JSONL knowledge base, in file order.

    A line that is not a JSON object with string ``title`` and ``text`` is an error naming the file and
    line. Blank lines are ignored; an entry with an empty text, or the same title and text as an earlier
    one (ignoring case and spacing), is skipped and counted (``skipped``: ``path:line: reason``).
    ``wordings[i]`` is entry i's text followed by its optional ``"wordings"`` (a list of non-empty
    strings, else an error naming the line). ``content_hash`` is the sha256 of the file's bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"knowledge base {self.path} does not exist")
        raw = self.path.read_bytes()
        self.content_hash = hashlib.sha256(raw).hexdigest()
        self.titles: list[str] = []
        self.texts: list[str] = []
        self.wordings: list[tuple[str, ...]] = []
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
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("title"), str)
                or not isinstance(row.get("text"), str)
            ):
                raise ValueError(f'{where}: expected an object with string "title" and "text", got {line[:80]!r}')  # noqa: TRY004 - bad data, not a bad call
            title, text = row["title"].strip(), row["text"].strip()
            others = row.get("wordings", [])
            if not isinstance(others, list) or not all(isinstance(w, str) and w.strip() for w in others):
                raise ValueError(f'{where}: "wordings" must be a list of non-empty strings, got {others!r:.80}')
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
            self.wordings.append((text, *(w.strip() for w in others)))
        if not self.texts:
            raise ValueError(f"knowledge base {self.path} has no entries")

    def __len__(self) -> int:
        return len(self.texts)

    def documents(self) -> list[str]:
        """What is embedded per entry: "title: text" (the title helps short queries that name the thing)."""
        return [f"{title}: {text}" for title, text in zip(self.titles, self.texts)]

    def summary(self) -> str:
        return f"{self.path.name}: {len(self)} entries, {len(self.skipped)} skipped ({self.duplicates} duplicates)"
