"""Caption-back scores of benchmark rows, from the images their runs kept: the seed pipeline's evaluation, offline.

Every image a ``run.py`` row scored is kept under its run (``eval/<export>/images/adapter/<prompt id>_seed<k>.png``),
the base columns' under ``base/images/``. This script captions each with the shape checker's reading in the base's
vocabulary ("two red circles", ``metrics/captions.py`` ``checker_caption``) and scores the captions against each
prompt's complex prompt with BLEU-1, ROUGE-1 and ROUGE-L (METEOR too with ``--wordnet``), split by split, every
training seed and world of a row pooled. Toy-world captions are three words, so BLEU-4 is 0 by construction and is
left out. A row is read at its last scored step unless ``--step ROW=N`` says otherwise.

    python experiments/toyworld_benchmark/caption_back.py experiments/toyworld_benchmark/results_unclip \\
        experiments/toyworld_benchmark/results_pixelsnail --out experiments/toyworld_benchmark/caption_back.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import run as benchmark  # run.py beside this file: its rows, run folders and results

SPLITS = ("adapter_train", "held_out_combinations", "held_out_objects")
METRICS = ("bleu_1", "rouge1_f", "rougeL_f")
BASE_COLUMNS = {"base + simple": "base", "base + complex": "base_complex"}


def load_results(results_dir: Path) -> dict:
    return benchmark.load_results(results_dir / "results.json")


def step_images(run: Path, step: int, scored_as: str | None = None) -> Path:
    """The images a run's export at ``step`` was scored with: ``eval/<name ending in step<N>>/images/adapter``, or a
    run's only evaluated export (unCLIP's oracle scores its final ``decoder``). ``scored_as``: a row scored from
    this run's exports with other settings (``run.SCORED_FROM``), whose images are ``eval/<export>@<row>``."""
    suffix = f"step{step}" if scored_as is None else f"step{step}@{scored_as}"
    evaluated = sorted(
        p
        for p in (run / "eval").iterdir()
        if (p / "images" / "adapter").is_dir() and (scored_as is None) == ("@" not in p.name)
    )
    at_step = [p for p in evaluated if p.name.endswith(suffix)]
    if len(at_step) == 1:
        return at_step[0] / "images" / "adapter"
    if len(evaluated) == 1:
        return evaluated[0] / "images" / "adapter"
    raise FileNotFoundError(f"{run / 'eval'}: no kept images of step {step} (found {[p.name for p in evaluated]})")


def caption_folder(folder: Path, references: dict[str, tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """{split: [(caption, reference)]} of every ``<prompt id>_seed<k>.png`` in ``folder``; ``references``:
    prompt id -> (split, complex prompt)."""
    from PIL import Image

    from sur_lightning.evaluation.metrics.captions import checker_caption

    pairs = defaultdict(list)
    for image in sorted(folder.glob("*.png")):
        prompt_id = image.stem.rsplit("_seed", 1)[0]
        if prompt_id not in references:
            raise KeyError(f"{image}: prompt id {prompt_id!r} is not in the world's suites")
        split, reference = references[prompt_id]
        with Image.open(image) as opened:
            pairs[split].append((checker_caption(opened.convert("RGB")), reference))
    if not pairs:
        raise FileNotFoundError(f"{folder}: no images")
    return pairs


def world_references(split_seed: int) -> dict[str, tuple[str, str]]:
    from sur_lightning.toyworld import world

    return {
        p.id: (split, p.complex)
        for split in SPLITS
        for p in world.suite(ROOT / "data" / "toyworld", split, seed=split_seed)
    }


def collect(results_dirs: list[Path], steps: dict[str, int], references_of=world_references) -> tuple[dict, dict]:
    """({row: {split: pairs}}, {row: {"step", "seeds", "worlds"}}), base columns included once per world.
    ``references_of(split_seed)``: prompt id -> (split, complex prompt) of that world."""
    pairs: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    read_at: dict[str, dict] = {}
    based = set()
    scored_from = benchmark.SCORED_FROM
    for results_dir in results_dirs:
        results = load_results(results_dir)
        for split_seed, world in results["splits"].items():
            references = references_of(split_seed)
            if split_seed not in based and (results_dir / f"split{split_seed}" / "base" / "images").is_dir():
                based.add(split_seed)
                for column, folder in BASE_COLUMNS.items():
                    read_at.setdefault(column, {"step": None, "seeds": set(), "worlds": set()})["worlds"].add(
                        split_seed
                    )
                    found = caption_folder(results_dir / f"split{split_seed}" / "base" / "images" / folder, references)
                    for split, found_pairs in found.items():
                        pairs[column][split] += found_pairs
            for row, seeds in world["runs"].items():
                for seed, scored in seeds.items():
                    if not scored:
                        continue
                    step = steps.get(row, max(scored))
                    if step not in scored:
                        continue
                    trained, scored_as = (benchmark.SCORED_FROM[row][0], row) if row in scored_from else (row, None)
                    folder = benchmark.RUN_FOLDER.get(trained, trained)
                    run = results_dir / f"split{split_seed}" / "runs" / folder / f"seed{seed}"
                    for split, found_pairs in caption_folder(step_images(run, step, scored_as), references).items():
                        pairs[row][split] += found_pairs
                    seen = read_at.setdefault(row, {"step": step, "seeds": set(), "worlds": set()})
                    seen["seeds"].add(seed)
                    seen["worlds"].add(split_seed)
    return pairs, read_at


def score(pairs: dict, wordnet: str | None) -> dict[str, dict[str, dict]]:
    from sur_lightning.evaluation.metrics.captions import score_captions

    scores = {}
    for row, by_split in pairs.items():
        scores[row] = {}
        for split in SPLITS:
            if by_split.get(split):
                captions, references = zip(*by_split[split])
                result = score_captions(
                    list(captions), list(references), meteor_metric=wordnet is not None, wordnet=wordnet
                )
                result.pop("bleu_4")
                scores[row][split] = {"n": len(captions), **result}
    return scores


def markdown(scores: dict, read_at: dict, metrics: tuple[str, ...]) -> str:
    header = "| row | step | seeds | worlds |" + "".join(f" {split}: {' / '.join(metrics)} |" for split in SPLITS)
    lines = [header, "|---" * (4 + len(SPLITS)) + "|"]
    for row, by_split in scores.items():
        where = read_at.get(row)
        cells = [
            row,
            str(where["step"] or "–"),
            str(len(where["seeds"]) or "–"),
            " ".join(map(str, sorted(where["worlds"]))),
        ]
        for split in SPLITS:
            cell = by_split.get(split)
            cells.append(" / ".join(f"{cell[m]:.2f}" for m in metrics) if cell else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="run.py --out folders")
    parser.add_argument("--step", action="append", default=[], metavar="ROW=N", help="read ROW at step N")
    parser.add_argument("--wordnet", default=None, help="a WordNet folder for METEOR (none on this machine)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (and its .json beside it)")
    args = parser.parse_args()
    steps = {}
    for item in args.step:
        row, _, value = item.partition("=")
        if not value.isdigit():
            parser.error(f"--step {item!r}: expected ROW=N")
        steps[row] = int(value)

    pairs, read_at = collect(args.results, steps)
    scores = score(pairs, args.wordnet)
    metrics = METRICS + (("meteor",) if args.wordnet else ())
    table = markdown(scores, read_at, metrics)
    print(table)
    if args.out:
        args.out.write_text(table)
        record = {
            row: {"read_at": {k: sorted(v) if isinstance(v, set) else v for k, v in read_at.get(row, {}).items()}, **s}
            for row, s in scores.items()
        }
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
