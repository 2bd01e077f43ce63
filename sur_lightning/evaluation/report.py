"""The evaluation report: per-split accuracies with 95 % intervals, the share of the gap between base + simple
and base + complex that each adapter closes (with a paired bootstrap interval), the markdown tables, and
writing and logging the report (``report.json``, ``report.md``, a W&B table with the images).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sur_lightning.generation.pipeline import Rendered


ACCURACIES = ("color_accuracy", "shape_accuracy", "count_accuracy")


def _rate(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% half-width) of 0/1 values, the normal approximation to the binomial."""
    p = float(np.mean(values))
    return p, 1.96 * float(np.sqrt(p * (1 - p) / len(values)))


def split_scores(report: dict) -> dict[str, dict[str, dict]]:
    """{column: {split: {accuracy: value, accuracy_ci95: half-width, n: images}}} from the per-image rows;
    the split is the prompt's category. The 95% interval is the normal approximation to the binomial.

    Where the rows have them, also ``valid_image`` (share of valid images) with its ``valid_image_ci95``,
    and, where rows carry their target ``count``, ``valid_by_count``: {count: {valid_image,
    valid_image_ci95, n}} (noise textures so far came at count 1: see DESIGN.md)."""
    out: dict = {}
    for row in report["images"]:
        out.setdefault(row["column"], {}).setdefault(row["category"], []).append(row)
    scores: dict = {}
    for column, splits in out.items():
        for split, rows in splits.items():
            entry = {"n": len(rows)}
            for name in (*ACCURACIES, "valid_image"):
                if name in rows[0]:
                    entry[name], entry[f"{name}_ci95"] = _rate([r[name] for r in rows])
            if "valid_image" in rows[0] and "count" in rows[0]:
                entry["valid_by_count"] = {}
                for count in sorted({r["count"] for r in rows}):
                    values = [r["valid_image"] for r in rows if r["count"] == count]
                    p, half = _rate(values)
                    entry["valid_by_count"][count] = {"valid_image": p, "valid_image_ci95": half, "n": len(values)}
            scores.setdefault(column, {})[split] = entry
    return scores


# Below this many images per split (pairs of prompt and seed) the paired percentile bootstrap cannot give an
# interval: its resamples take few distinct values (at n = 1 exactly one, so "1.00 [1.00, 1.00]"), and the
# normal-approximation intervals of the bounds have zero width at 0 or 1 right. No gap closed is stated then.
MIN_GAP_N = 10


def gap_verdicts(
    report: dict, min_gap: float = 0.05
) -> dict[str, dict[str, dict[str, tuple[float | None, str | None]]]]:
    """{column: {split: {accuracy: (share of the gap closed or None, why None or None)}}} for every adapter column.

    The share is (column − base) / (base+complex − base): "base" is the base model on the simple prompts (the
    lower bound), "base+complex" the base model on the complex prompts (the upper bound). It is None, with the
    reason, where it would be noise rather than a measurement:
    ``"n=3"``: fewer than ``MIN_GAP_N`` images in the split (the smallest of the three columns');
    ``"bounds inverted"``: base + simple scores above base + complex (the ratio's sign would flip: an adapter
    as wrong as base + complex would "close" the whole gap);
    ``"no gap"``: the bounds differ by less than ``min_gap``;
    ``"bounds overlap"``: the 95% intervals of the two bounds (``split_scores``) overlap."""
    scores = split_scores(report)
    low, high = scores["base"], scores["base+complex"]
    verdicts: dict = {}
    for column, splits in scores.items():
        if column in ("base", "base+complex"):
            continue
        for split, entry in splits.items():
            n = min(entry["n"], low[split]["n"], high[split]["n"])
            cells = {}
            for name in ACCURACIES:
                if name not in entry:
                    continue
                lower, upper = low[split][name], high[split][name]
                lower_ci, upper_ci = low[split][f"{name}_ci95"], high[split][f"{name}_ci95"]
                if n < MIN_GAP_N:
                    cells[name] = (None, f"n={n}")
                elif upper < lower:
                    cells[name] = (None, "bounds inverted")
                elif upper - lower < min_gap:
                    cells[name] = (None, "no gap")
                elif lower + lower_ci >= upper - upper_ci:
                    cells[name] = (None, "bounds overlap")
                else:
                    cells[name] = ((entry[name] - lower) / (upper - lower), None)
            verdicts.setdefault(column, {})[split] = cells
    return verdicts


def gap_closed(report: dict, min_gap: float = 0.05) -> dict[str, dict[str, dict[str, float | None]]]:
    """{column: {split: {accuracy: (column − base) / (base+complex − base)}}} for every adapter column, None where
    ``gap_verdicts`` gives a reason instead (``gap_closed_reasons``)."""
    return {
        column: {split: {name: value for name, (value, _) in cells.items()} for split, cells in splits.items()}
        for column, splits in gap_verdicts(report, min_gap).items()
    }


def gap_closed_reasons(report: dict, min_gap: float = 0.05) -> dict[str, dict[str, dict[str, str]]]:
    """{column: {split: {accuracy: reason}}} for each accuracy ``gap_closed`` leaves None: ``"n=1"``,
    ``"bounds inverted"``, ``"no gap"`` or ``"bounds overlap"`` (``gap_verdicts``)."""
    return {
        column: {
            split: {name: reason for name, (_, reason) in cells.items() if reason} for split, cells in splits.items()
        }
        for column, splits in gap_verdicts(report, min_gap).items()
    }


def gap_closed_intervals(
    report: dict, n_boot: int = 1000, seed: int = 0, min_gap: float = 0.05
) -> dict[str, dict[str, dict[str, tuple[float, float] | None]]]:
    """{column: {split: {accuracy: (2.5th, 97.5th percentile)}}}: a bootstrap 95% interval of ``gap_closed``.

    Each of ``n_boot`` resamples draws a split's (prompt_id, seed) pairs with replacement and takes the
    same draw in the base, base+complex and adapter columns: they share prompts and seeds, so their
    errors are correlated and resampling them apart would overstate the spread. Only pairs present in
    all three columns count. None where ``gap_closed`` is None (``gap_closed_reasons`` says why); resamples
    whose own gap falls below ``min_gap`` (or is inverted) have no ratio and are left out. Rows without ``prompt_id`` and
    ``seed`` give no interval (the split is left out). Deterministic: a fixed-seed numpy Generator per
    (column, split), so one column's interval does not depend on which other columns the report holds."""
    point = gap_closed(report, min_gap)
    by_key: dict = {}
    for row in report["images"]:
        if "prompt_id" in row and "seed" in row:
            by_key.setdefault((row["column"], row["category"]), {})[(row["prompt_id"], row["seed"])] = row
    intervals: dict = {}
    for column, splits in point.items():
        for split, closed in splits.items():
            tables = [by_key.get((c, split), {}) for c in ("base", "base+complex", column)]
            keys = sorted(set(tables[0]) & set(tables[1]) & set(tables[2]))
            if not keys:
                continue
            draws = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))  # [n_boot, n]
            entry = {}
            for name, value in closed.items():
                if value is None:
                    entry[name] = None
                    continue
                values = [np.array([t[k][name] for k in keys], dtype=float) for t in tables]  # 3 x [n]
                low, high, adapter = (v[draws].mean(1) for v in values)  # each [n_boot]
                gap = high - low
                ok = gap >= min_gap  # an inverted resample's ratio has the wrong sign: no ratio
                ratios = (adapter[ok] - low[ok]) / gap[ok]
                entry[name] = tuple(float(q) for q in np.percentile(ratios, [2.5, 97.5])) if ratios.size else None
            intervals.setdefault(column, {})[split] = entry
    return intervals


def toyworld_table(report: dict, splits: Sequence[str] | None = None) -> str:
    """Markdown: one row per (split, column) with colour / shape / count accuracy and the valid-image rate
    ± 95% CI (and that rate per target count), and the share of the base's simple-vs-complex gap each
    adapter closes with its bootstrap 95% interval (``gap_closed_intervals``)."""
    scores = split_scores(report)
    # The points and reasons from the rows, so a report.json written before the small-n rules reads honestly too.
    verdicts = gap_verdicts(report)
    intervals = report.get("gap_closed_ci95") or gap_closed_intervals(report)
    splits = list(splits or dict.fromkeys(s for column in scores.values() for s in column))
    lines = [
        "| split | column | n | colour | shape | count | valid | valid by count | gap closed (colour / shape / count) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"base": "base + simple", "base+complex": "base + complex"}
    for split in splits:
        for column, by_split in scores.items():
            if split not in by_split:
                continue
            entry = by_split[split]
            cells = [
                f"{entry[n]:.2f} ± {entry[n + '_ci95']:.2f}" if n in entry else "–"
                for n in (*ACCURACIES, "valid_image")
            ]
            by_count = entry.get("valid_by_count", {})
            cells.append(", ".join(f"{count}: {c['valid_image']:.2f}" for count, c in by_count.items()) or "–")
            gap = verdicts.get(column, {}).get(split)
            interval = intervals.get(column, {}).get(split, {})
            gap_cell = (
                " / ".join(_gap_cell(*gap.get(n, (None, None)), interval.get(n)) for n in ACCURACIES) if gap else ""
            )
            label = names.get(column, f"{column} + simple")
            lines.append(f"| {split} | {label} | {entry['n']} | " + " | ".join(cells) + f" | {gap_cell} |")
    return "\n".join(lines)


def split_rows(report: dict) -> tuple[list[str], list[list]]:
    """``toyworld_table`` as (column names, rows) for a W&B Table: one row per (split, column) with each accuracy
    and the valid-image rate and their 95 % half-widths, and for adapter columns the gap closed per accuracy
    with its bootstrap interval (``gap_closed/<accuracy>``, ``_low``, ``_high``); None where a value has none."""
    scores = split_scores(report)
    closed = report.get("gap_closed") or gap_closed(report)
    intervals = report.get("gap_closed_ci95") or gap_closed_intervals(report)
    rates = (*ACCURACIES, "valid_image")
    columns = [
        "split",
        "column",
        "n",
        *(f"{n}{s}" for n in rates for s in ("", "_ci95")),
        *(f"gap_closed/{n}{s}" for n in ACCURACIES for s in ("", "_low", "_high")),
    ]
    rows = []
    for split in dict.fromkeys(s for column in scores.values() for s in column):
        for column, by_split in scores.items():
            if split not in by_split:
                continue
            entry = by_split[split]
            row = [split, column, entry["n"], *(entry.get(f"{n}{s}") for n in rates for s in ("", "_ci95"))]
            gap = closed.get(column, {}).get(split) or {}
            interval = intervals.get(column, {}).get(split) or {}
            for name in ACCURACIES:
                row += [gap.get(name), *(interval.get(name) or (None, None))]
            rows.append(row)
    return columns, rows


def _gap_cell(value: float | None, reason: str | None, interval: Sequence[float] | None) -> str:
    """``0.67 [0.40, 0.90]``, ``0.67`` without an interval, or ``– (n=1)`` with the reason there is no value."""
    if value is None:
        return f"– ({reason})" if reason else "–"
    # An interval that does not hold its own point, or whose ends are inverted, is not printed.
    if interval is None or not interval[0] <= value <= interval[1]:
        return f"{value:.2f}"
    return f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def markdown_table(columns: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(name for summary in columns.values() for name in summary))
    lines = ["| column | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for column, summary in columns.items():
        cells = [_format(summary.get(name)) for name in names]
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def write_report(out_dir: Path, report: dict, settings: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps({"settings": settings, **report}, indent=2, default=str))
    lines = ["# Evaluation", "", markdown_table(report["columns"]), ""]
    if "gap_closed" in report:
        lines += ["## Toy world: accuracy by split, and the gap each adapter closes", "", toyworld_table(report), ""]
    # The training callback's report has no per-category summaries; evaluate's has.
    for column, categories in report.get("categories", {}).items():
        lines += [f"## {column} by category", "", markdown_table(categories), ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def log_report(loggers: Sequence, report: dict, rendered: Sequence[Rendered], step: int = 0) -> None:
    """Summary metrics as ``eval/<column>/<metric>`` to every logger; a table with the images to those that
    have ``log_table`` (W&B)."""
    for logger in loggers:
        flat = {
            f"eval/{column}/{name}": value
            for column, summary in report["columns"].items()
            for name, value in summary.items()
        }
        logger.log_metrics(flat, step=step)
        if hasattr(logger, "log_table"):
            import wandb

            rows = report["images"]
            names = [k for k in rows[0] if k not in ("file",)] if rows else []
            images = {(r.column, r.prompt.id, r.seed): r.image for r in rendered}
            data = [
                [wandb.Image(images[(row["column"], row["prompt_id"], row["seed"])])] + [row[k] for k in names]
                for row in rows
            ]
            logger.log_table(key="eval/images", columns=["image", *names], data=data)
