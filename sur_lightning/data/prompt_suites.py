"""Prompt suites for evaluation: built-in short narrative prompts and loaders for user files.

Built-in suites, in the spirit of the SUR paper's simple prompts (arXiv 2305.05189):
``counting`` ("five dogs"), ``color`` ("a red apple on a blue plate") and ``action``
("a chef tossing pizza dough"). User suites load from

- a ``.txt`` file, one prompt per line (blank lines and lines starting with ``#`` skipped);
- a ``.jsonl`` file, rows ``{"prompt": ..., "id": optional, "category": optional}``;
  malformed rows are all reported at once with file and line number;
- a folder in DPG-Bench's layout (ELLA's ``dpg_bench/prompts/<id>.txt``): one prompt per
  ``.txt`` file, the file stem is the id. Either the ``prompts`` folder or its parent works.

Every loader returns a list of ``Prompt(id, prompt, category)``. ``load_prompt_list`` is what the entry points
and callbacks call: it also takes a list of strings, a dataset folder or a dataset config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: a stable ``id`` (used for file names), the text, and its suite/category.

    Optional, for suites whose images can be checked (the toy world): ``complex``, a detailed prompt
    for the same image (rendered by the base model as the upper bound), and ``target``, the
    (count, colour, shape) the image must show.
    """

    id: str
    prompt: str
    category: str
    complex: str | None = None
    target: tuple[int, str, str] | None = None


SUITES: dict[str, tuple[str, ...]] = {
    "counting": (
        "five dogs",
        "three cats",
        "two apples",
        "four birds on a wire",
        "one red balloon",
        "six candles on a cake",
        "three boats on a lake",
        "two horses in a field",
        "four cups of coffee",
        "five oranges in a bowl",
        "two children playing",
        "three bicycles",
        "seven stars",
        "a pair of shoes",
        "four chairs around a table",
        "two cars on a road",
        "three sheep",
        "five flowers in a vase",
        "two penguins",
        "three books on a shelf",
        "four ducks in a pond",
        "two elephants",
    ),
    "color": (
        "a red apple on a blue plate",
        "a yellow car next to a green tree",
        "a black cat on a white sofa",
        "a blue bird on a red fence",
        "a purple umbrella in the rain",
        "an orange pumpkin on a green lawn",
        "a pink cake on a brown table",
        "a white horse in a yellow field",
        "a green frog on a red leaf",
        "a silver spoon in a blue cup",
        "a red door on a white house",
        "a brown dog with a blue collar",
        "a yellow banana on a black plate",
        "a green bottle and a red cup",
        "a blue vase with white flowers",
        "an orange fish in a clear bowl",
        "a gray cat on a pink pillow",
        "a red bus on a gray street",
        "a purple flower in a green pot",
        "a white boat on a blue sea",
        "a golden crown on a red cushion",
        "a black umbrella and a yellow raincoat",
    ),
    "action": (
        "a chef tossing pizza dough",
        "a dog catching a frisbee",
        "a boy flying a kite",
        "a girl riding a bicycle",
        "a man painting a fence",
        "a cat chasing a mouse",
        "a woman reading a book in a park",
        "a child blowing bubbles",
        "a surfer riding a wave",
        "a musician playing the violin",
        "a baker pulling bread from an oven",
        "a horse jumping over a fence",
        "a bird feeding its chicks",
        "a gardener watering flowers",
        "a skier racing down a slope",
        "an old man feeding pigeons",
        "two friends sharing an umbrella",
        "a firefighter spraying water",
        "a monkey eating a banana",
        "a student writing on a blackboard",
        "a dancer leaping on a stage",
        "a fisherman casting a net",
    ),
}


def builtin_suite(name: str) -> list[Prompt]:
    """The built-in suite ``name`` (one of ``SUITES``), ids ``"<name>-000"``, ``"<name>-001"``, ..."""
    if name not in SUITES:
        raise KeyError(f"unknown prompt suite {name!r}; built-in suites are {sorted(SUITES)}, or pass a file/folder")
    return [Prompt(f"{name}-{i:03d}", text, name) for i, text in enumerate(SUITES[name])]


def load_txt(path: str | Path, category: str | None = None) -> list[Prompt]:
    """One prompt per line; ids ``"<stem>-<line number>"``; category defaults to the file stem."""
    path = Path(path)
    category = category or path.stem
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            prompts.append(Prompt(f"{path.stem}-{number:04d}", text, category))
    if not prompts:
        raise ValueError(f"{path}: no prompts found (expected one prompt per line)")
    return prompts


def load_jsonl(path: str | Path, category: str | None = None) -> list[Prompt]:
    """Rows ``{"prompt": str, "id"?: str, "category"?: str, "complex"?: str, "count"?: int, "color"?: str,
    "shape"?: str}``; ids default to ``"<stem>-<line number>"``. ``count``, ``color`` and ``shape`` come
    together or not at all (they make the row's ``target``).

    Raises ``ValueError`` listing every malformed row as ``file:line: reason``.
    """
    path = Path(path)
    category = category or path.stem
    prompts, errors = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            errors.append(f"{path}:{number}: invalid JSON ({error.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            errors.append(f'{path}:{number}: expected an object with a non-empty string "prompt"')
            continue
        prompt_id = str(row.get("id", f"{path.stem}-{number:04d}"))
        target_keys = [key for key in ("count", "color", "shape") if key in row]
        if target_keys and len(target_keys) < 3:
            errors.append(f"{path}:{number}: a target needs all of count, color, shape; got only {target_keys}")
            continue
        if target_keys and not (
            isinstance(row["count"], int) and isinstance(row["color"], str) and isinstance(row["shape"], str)
        ):
            errors.append(f"{path}:{number}: target count must be an integer, color and shape strings")
            continue
        if "complex" in row and not isinstance(row["complex"], str):
            errors.append(f'{path}:{number}: "complex" must be a string')
            continue
        target = (row["count"], row["color"], row["shape"]) if target_keys else None
        category_name = str(row.get("category", category))
        prompts.append(Prompt(prompt_id, row["prompt"].strip(), category_name, row.get("complex"), target))
    if errors:
        raise ValueError("malformed prompt rows:\n" + "\n".join(errors))
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def _natural_key(stem: str) -> tuple:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def load_dpg_bench(folder: str | Path, category: str = "dpg_bench") -> list[Prompt]:
    """DPG-Bench layout: ``<folder>/prompts/<id>.txt`` (or ``<folder>/<id>.txt``), one prompt per file.

    Ids are the file stems, sorted numerically where numeric. An empty file is an error naming it.
    """
    folder = Path(folder)
    if (folder / "prompts").is_dir():
        folder = folder / "prompts"
    files = sorted(folder.glob("*.txt"), key=lambda f: _natural_key(f.stem))
    if not files:
        raise ValueError(f"{folder}: no .txt prompt files (DPG-Bench layout is prompts/<id>.txt, one prompt per file)")
    prompts = []
    for file in files:
        text = " ".join(file.read_text(encoding="utf-8").split())
        if not text:
            raise ValueError(f"{file}: empty prompt file")
        prompts.append(Prompt(file.stem, text, category))
    return prompts


def load_prompts(source: str | Path, category: str | None = None) -> list[Prompt]:
    """Load a suite from a built-in name, a ``.txt``/``.jsonl`` file, or a DPG-Bench-style folder."""
    if isinstance(source, str) and source in SUITES:
        return builtin_suite(source)
    path = Path(source)
    if path.is_dir():
        return load_dpg_bench(path, category or "dpg_bench")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such prompt file or folder; built-in suites are {sorted(SUITES)}")
    if path.suffix == ".jsonl":
        return load_jsonl(path, category)
    if path.suffix == ".txt":
        return load_txt(path, category)
    raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r} (use .txt, .jsonl or a folder)")


def load_prompt_list(source, num_prompts: int | None = None) -> list[Prompt]:
    """Prompts from a list of strings, a built-in suite name (counting/color/action), a .txt/.jsonl file,
    a DPG-Bench folder, a dataset folder in the SURD layout (its ``metadata.jsonl`` simple prompts), or
    a dataset config (``_target_`` returning such a folder). ``num_prompts`` keeps the first N."""
    from hydra.utils import instantiate

    if isinstance(source, Mapping):  # a config node, or a dict
        source = instantiate(source)
    if isinstance(source, list | tuple) and source and all(isinstance(p, Prompt) for p in source):
        prompts = list(source)
    elif isinstance(source, Sequence) and not isinstance(source, str):  # a list (or a config's list) of strings
        prompts = [Prompt(f"prompt-{i:03d}", str(text), "custom") for i, text in enumerate(source)]
    elif Path(str(source), "metadata.jsonl").is_file():
        folder = Path(str(source))
        prompts = []
        for number, line in enumerate((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line) if line.strip() else None
            if row is not None and not isinstance(row.get("text"), str):
                raise ValueError(f"{folder / 'metadata.jsonl'}:{number}: no simple prompt in key 'text'")
            if row is not None:
                prompts.append(
                    Prompt(Path(row.get("file_name", f"{number:06d}")).stem, row["text"], folder.parent.name)
                )
    else:
        prompts = load_prompts(str(source))
    if not prompts:
        raise ValueError(f"prompts: nothing to render from {source!r}")
    return prompts[:num_prompts] if num_prompts else prompts
