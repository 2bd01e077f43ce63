"""The converged table: every row read at the budget where its learning curve has flattened.

The SUR rows flatten by 1,200 steps, so they are read at 2,400 from the main benchmark (`summary.json`); the ELLA rows
were still rising at 2,400 and are read at 4,800 from the longer runs (`results_4800/summary.json`,
`results_name_dropout/summary.json`). Those files are written by `run.py`; this script only reads them and writes
`converged.md` and the charts of every row's curve from the runs it is read at (`curve_converged_steps.png`,
`curve_converged_seconds.png`).

    python experiments/toyworld_benchmark/converged.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from sur_lightning.evaluation.learning_curve import chart, converged_step, fmt

SPLITS = ("adapter_train", "held_out_combinations", "held_out_objects")
HELD_OUT = ("held_out_combinations", "held_out_objects")
# A curve has flattened from the first step whose colour gap stays within this of the last one (learning_curve).
TOLERANCE = 0.05
# (summary file, step) each row is read at; the order is the table's.
READ_AT = {
    "ella_name_dropout_p1_anonymise": ("results_name_dropout/summary.json", 4800),
    "ella_rag": ("results_4800/summary.json", 4800),
    "ella_name_dropout": ("results_4800/summary.json", 4800),
    "ella_name_dropout_p1": ("results_name_dropout/summary.json", 4800),
    "ella_demo": ("results_4800/summary.json", 4800),
    "ella": ("results_4800/summary.json", 4800),
    "sur_multi_teacher": ("summary.json", 2400),
    "sur_small": ("summary.json", 2400),
    "sur_demo": ("summary.json", 2400),
    "sur_caption_dropout": ("summary.json", 2400),
    "sur_released": ("summary.json", 2400),
    "mse_eta_one": ("summary.json", 2400),
    "sur_paper": ("summary.json", 2400),
    "denoising_only": ("summary.json", 2400),
    # The other generators (issues 34, 35): unCLIP's prior through its decoder (and with the knowledge recipe), the
    # decoder given a true image's embedding (the bound of every prior), and the VQ + PixelSNAIL generator.
    "unclip": ("results_unclip/summary.json", 2000),
    "unclip_anonymise": ("results_unclip/summary.json", 2000),
    "unclip_oracle": ("results_unclip/summary.json", 1500),
    "pixelsnail": ("results_pixelsnail/summary.json", 2400),
}


def curves(read_at: dict[str, tuple[str, int]] = READ_AT, root: Path = HERE) -> dict[str, dict]:
    """{row: {step: summary entry}} from each row's own file, steps as ints (the learning-curve chart's input)."""
    loaded = {file: json.loads((root / file).read_text()) for file in {file for file, _ in read_at.values()}}
    rows = {}
    for name, (file, step) in read_at.items():
        rows[name] = {int(s): entry for s, entry in loaded[file].get(name, {}).items()}
        if step not in rows[name]:
            raise KeyError(f"{root / file} has no row {name!r} at step {step}")
    return rows


def flat_from(read: dict[int, dict]) -> str:
    """The step from which each held-out colour gap stays within TOLERANCE of the last step's, over the steps up to
    the one read: "still moving" where the last doubling moved it more, "–" with one step."""
    flat = [converged_step(read, split, "gap_color_accuracy", TOLERANCE) for split in HELD_OUT]
    return "–" if len(read) < 2 else " / ".join("still moving" if s is None else str(s) for s in flat)


def table(read_at: dict[str, tuple[str, int]] = READ_AT, root: Path = HERE) -> str:
    header = (
        "| row | step | seeds | train s |"
        + "".join(f" {split}: colour | shape | valid |" for split in SPLITS)
        + " colour flat from (held-out combinations / objects) |"
    )
    lines = [header, "|---" * (5 + 3 * len(SPLITS)) + "|"]
    for name, summary in curves(read_at, root).items():
        step = read_at[name][1]
        entry = summary[step]
        cells = []
        for split in SPLITS:
            cell = entry[split]
            cells += [
                fmt(cell.get("gap_color_accuracy")),
                fmt(cell.get("gap_shape_accuracy")),
                fmt(cell.get("valid_image")),
            ]
        cells.append(flat_from({s: e for s, e in summary.items() if s <= step}))
        lines.append(
            f"| {name} | {step} | {entry['seeds']} | {entry['train_seconds']:.0f} | " + " | ".join(cells) + " |"
        )
    return (
        "Gap closed (colour, shape) and the valid-image rate, each row at the longest budget measured for it; means over "
        "the training seeds in the `seeds` column (3 unless it says fewer) with 95 % "
        "intervals (two-level bootstrap). The last column is the step from which the "
        f'held-out colour gap stays within ±{TOLERANCE} of that budget\'s value, or "still moving" where the last '
        "step moved it more (– with one step). Written by `converged.py` from "
        + ", ".join(f"`{file}`" for file in dict.fromkeys(file for file, _ in read_at.values()))
        + ".\n\n"
        + "\n".join(lines)
        + "\n"
    )


# Rows measured on several worlds (run.py --split-seeds), read from the pooled summaries: (summary file, step).
ACROSS_WORLDS = {
    # The preset as it trains now (9,600 steps), one training seed per world: the row's name in its summary is the
    # part before "@".
    "ella_unseen_objects_variant_mean@9600": ("results_9600/summary.json", 9600),
    "ella_unseen_objects_variant_mean": ("results_variant_mean/summary.json", 4800),
    "ella_unseen_objects_wordings": ("results_wordings/summary.json", 4800),
    "ella_unseen_objects": ("results_splits/summary.json", 4800),
    "ella_unseen_objects_one_wording_variant_mean": ("results_one_wording_mean/summary.json", 4800),
    "ella_demo": ("results_ablation/summary.json", 2400),
    "ella_minilm": ("results_ablation/summary.json", 2400),
    "ella_base_clip": ("results_ablation/summary.json", 2400),
    "ella_random_llm": ("results_ablation/summary.json", 2400),
}


def across_worlds_table(read_at: dict[str, tuple[str, int]] = ACROSS_WORLDS, root: Path = HERE) -> str:
    """Each row pooled over its worlds (each weighted equally) with the worst world beside every gap; rows whose
    summary is not written yet are left out and named below the table."""
    header = (
        "| row | step | worlds | runs |"
        + "".join(f" {split}: colour (worst) | shape (worst) | valid |" for split in HELD_OUT)
        + " colour flat from (held-out combinations / objects) |"
    )
    lines = [header, "|---" * (5 + 3 * len(HELD_OUT)) + "|"]
    missing = []
    for name, (file, step) in read_at.items():
        path = root / file
        row = name.split("@")[0]
        summary = json.loads(path.read_text()).get(row, {}) if path.exists() else {}
        entry = summary.get(str(step))
        if entry is None or "worst" not in entry:
            missing.append(f"`{name}` ({file}, step {step})")
            continue
        cells = []
        for split in HELD_OUT:
            worst = entry["worst"][split]
            for metric in ("gap_color_accuracy", "gap_shape_accuracy"):
                w = worst.get(metric) or {}
                tail = f" ({w['mean']:.2f}, world {w['split_seed']})" if "mean" in w else ""
                cells.append(fmt(entry[split].get(metric)) + tail)
            cells.append(fmt(entry[split].get("valid_image")))
        cells.append(flat_from({int(s): e for s, e in summary.items() if int(s) <= step}))
        lines.append(f"| {name} | {step} | {entry['split_seeds']} | {entry['seeds']} | " + " | ".join(cells) + " |")
    note = f"\n\nNot measured yet: {', '.join(missing)}.\n" if missing else "\n"
    return (
        "Across worlds: each row pooled over the worlds it ran on (each world weighted equally; 95 % intervals from a "
        "three-level bootstrap over worlds, training seeds and prompt × seed pairs), the worst world's own mean beside "
        "each gap. `runs` counts (world, training seed) pairs; the last column as in the table above. Written by `converged.py` from "
        + ", ".join(f"`{file}`" for file in dict.fromkeys(file for file, _ in read_at.values()))
        + ".\n\n"
        + "\n".join(lines)
        + note
    )


def main() -> None:
    text = table() + "\n## Across worlds\n\n" + across_worlds_table()
    (HERE / "converged.md").write_text(text)
    rows = curves()
    for x, suffix in (("step", "steps"), ("train_seconds", "seconds")):
        chart(rows, SPLITS, HERE / f"curve_converged_{suffix}.png", x=x)
    print(text)


if __name__ == "__main__":
    main()
