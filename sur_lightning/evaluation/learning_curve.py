"""Learning curves: a method judged by how it improves with budget, never by one short budget.

A training run exports its connector at several steps (``callbacks.adapter_export.at_steps=[300,600,...]``;
each export is a line of ``exports.jsonl`` with its step and training seconds). ``score_run`` renders every
exported adapter on a toy-world suite and scores it with the programmatic checker; ``summarise`` turns the
runs of several training seeds into, per step, split and accuracy, the mean over seeds of the share of the
base's simple-vs-complex gap closed, with a 95 % interval from a two-level bootstrap:

- resample the training seeds (the spread between runs of one recipe), then
- resample the (prompt, evaluation seed) pairs of the split, the same pairs for the adapter, base + simple
  and base + complex columns (they share prompts and seeds, so their errors are paired).

Per image a run keeps only its correctness (``color_accuracy``, ``shape_accuracy``, ``count_accuracy`` and,
when scored, ``valid_image``), so results stay small enough to commit and to re-summarise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np

ACCURACIES = ("color_accuracy", "shape_accuracy", "count_accuracy")
RATES = ACCURACIES + ("valid_image",)


def exported_adapters(run_dir: str | Path, prefix: str = "") -> list[dict]:
    """``[{"step", "train_seconds", "path"}]`` of a run's step exports, by step (a resumed run's re-export of a
    step replaces the earlier line). Raises ``FileNotFoundError`` naming ``exports.jsonl`` when there is none.
    ``prefix``: only the step exports whose names start with it (a run with two kinds of export: ``unclip``,
    ``decoder``); every ``<name>-step<N>`` export by default."""
    log = Path(run_dir) / "exports.jsonl"
    if not log.exists():
        raise FileNotFoundError(
            f"{log}: no exports; train with callbacks.adapter_export.at_steps=[...] to get a learning curve"
        )
    by_step = {}
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{log}:{number}: not valid JSON ({error.msg})") from None
        if not re.fullmatch(r".+-step\d+", Path(record["file"]).stem) or not record["file"].startswith(prefix):
            continue  # the end-of-training export (adapter.safetensors, pixelsnail/) repeats the last step
        by_step[int(record["step"])] = {**record, "path": Path(run_dir) / record["file"]}
    return [by_step[step] for step in sorted(by_step)]


def image_rows(report: dict, column: str) -> list[dict]:
    """The per-image correctness of one column of a ``score_columns`` report, keyed by prompt and seed."""
    keep = ("prompt_id", "seed", "category") + RATES
    return [{k: row[k] for k in keep if k in row} for row in report["images"] if row["column"] == column]


def score_run(
    run_dir: str | Path,
    score_adapter: Callable[[Path], list[dict]],
    done: dict[int, dict] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    prefix: str = "",
    steps: Collection[int] | None = None,
) -> dict[int, dict]:
    """``{step: {"train_seconds", "images": [per-image rows]}}`` for every exported adapter of a run, or for
    those at ``steps`` only.

    ``score_adapter(path)`` renders and scores one adapter and returns its per-image rows (``image_rows``).
    Steps already in ``done`` are kept as they are; ``on_step(step, result)`` is called after each new one,
    so a caller can write partial results as they come (a killed benchmark resumes where it stopped).
    """
    results = dict(done or {})
    for export in exported_adapters(run_dir, prefix):
        step = export["step"]
        if step in results or (steps is not None and step not in steps):
            continue
        results[step] = {"train_seconds": export["train_seconds"], "images": score_adapter(export["path"])}
        if on_step is not None:
            on_step(step, results[step])
    return results


def _by_pair(rows: Sequence[dict], split: str, name: str) -> dict[tuple[str, int], float]:
    return {(r["prompt_id"], int(r["seed"])): float(r[name]) for r in rows if r["category"] == split and name in r}


def summarise(
    runs: dict[int, dict[int, dict]],
    base_rows: Sequence[dict],
    complex_rows: Sequence[dict],
    splits: Sequence[str],
    n_boot: int = 1000,
    min_gap: float = 0.05,
    seed: int = 0,
) -> dict:
    """Per step (present in every seed's run), split and metric: the mean accuracy and gap closed over training
    seeds, each with a 95 % two-level bootstrap interval, and the mean training seconds at that step.

    ``runs``: ``{training seed: {step: {"train_seconds", "images"}}}``; ``base_rows`` / ``complex_rows``: the
    base's per-image rows on the simple / complex prompts (the lower and upper bound).
    Returns ``{step: {"train_seconds": s, "seeds": n, split: {metric: {"mean", "lo", "hi"},
    "gap_<metric>": {"mean", "lo", "hi"} or None}}}``; a gap is None when the bounds differ by < ``min_gap``.
    """
    rng = np.random.default_rng(seed)
    seeds = sorted(runs)
    steps = sorted(set.intersection(*(set(runs[s]) for s in seeds))) if seeds else []
    summary: dict = {}
    for step in steps:
        entry = {
            "train_seconds": float(np.mean([runs[s][step]["train_seconds"] for s in seeds])),
            "seeds": len(seeds),
        }
        for split in splits:
            entry[split] = {}
            for name in RATES:
                adapter = [_by_pair(runs[s][step]["images"], split, name) for s in seeds]
                pairs = sorted(set.intersection(*(set(a) for a in adapter))) if adapter else []
                if not pairs:
                    continue
                a = np.array([[values[p] for p in pairs] for values in adapter])  # [seeds, pairs]
                idx = rng.integers(0, len(pairs), (n_boot, len(pairs)))
                picks = rng.integers(0, len(seeds), (n_boot, len(seeds)))
                # Bootstrap replicate b: seeds picks[b], pairs idx[b]; the same pairs for every column.
                a_boot = np.stack([a[picks[b]][:, idx[b]].mean() for b in range(n_boot)])
                entry[split][name] = _interval(float(a.mean()), a_boot)
                low, high = _by_pair(base_rows, split, name), _by_pair(complex_rows, split, name)
                if name not in ACCURACIES or not all(p in low and p in high for p in pairs):
                    continue
                lo = np.array([low[p] for p in pairs])
                hi = np.array([high[p] for p in pairs])
                if abs(hi.mean() - lo.mean()) < min_gap:
                    entry[split][f"gap_{name}"] = None
                    continue
                gap = (a.mean(axis=1) - lo.mean()) / (hi.mean() - lo.mean())  # one per training seed
                lo_boot, hi_boot = lo[idx].mean(axis=1), hi[idx].mean(axis=1)
                spread = np.where(np.abs(hi_boot - lo_boot) < 1e-9, np.nan, hi_boot - lo_boot)
                gap_boot = (a_boot - lo_boot) / spread
                entry[split][f"gap_{name}"] = _interval(float(gap.mean()), gap_boot[np.isfinite(gap_boot)])
        summary[step] = entry
    return summary


def summarise_pooled(
    splits_runs: dict[int, tuple[dict, Sequence[dict], Sequence[dict]]],
    splits: Sequence[str],
    n_boot: int = 1000,
    min_gap: float = 0.05,
    seed: int = 0,
) -> dict:
    """``summarise`` pooled over several worlds (split seeds), each weighted equally, with a 95 % three-level
    bootstrap: resample the split seeds, then within each the training seeds, then the (prompt, evaluation seed)
    pairs, the same pairs for the adapter and the base's two columns.

    ``splits_runs``: ``{split seed: (runs, base_rows, complex_rows)}`` as ``summarise`` takes them. The pooled
    gap is that of the pooled means, ``(mean adapter - mean base) / (mean complex - mean base)``, so a world
    whose base columns barely differ weighs in by its accuracies, not by a ratio near 0/0. Returns, per step
    present in every run of every world, ``{"train_seconds", "seeds", "split_seeds", split: {metric, gap_<metric>}}``
    as ``summarise`` does, plus ``"worst"``: ``{split: {gap_<metric>: {"split_seed", "mean"}}}``, the world
    with the lowest gap closed (read from each world's own ``summarise``).
    """
    rng = np.random.default_rng(seed)
    worlds = sorted(splits_runs)
    step_sets = [set(run) for w in worlds for run in splits_runs[w][0].values()]
    steps = sorted(set.intersection(*step_sets)) if step_sets else []
    own = {w: summarise(*splits_runs[w], splits, n_boot=200, min_gap=min_gap, seed=seed) for w in worlds}
    summary: dict = {}
    for step in steps:
        entry = {
            "train_seconds": float(
                np.mean([r[step]["train_seconds"] for w in worlds for r in splits_runs[w][0].values()])
            ),
            "seeds": sum(len(splits_runs[w][0]) for w in worlds),
            "split_seeds": len(worlds),
            "worst": {},
        }
        for split in splits:
            entry[split], entry["worst"][split] = {}, {}
            for name in RATES:
                # Per world: [training seeds, pairs] of the adapter, [pairs] of the base's two columns.
                per_world = []
                for w in worlds:
                    runs, base_rows, complex_rows = splits_runs[w]
                    adapter = [_by_pair(runs[s][step]["images"], split, name) for s in sorted(runs)]
                    pairs = sorted(set.intersection(*(set(a) for a in adapter)))
                    low, high = _by_pair(base_rows, split, name), _by_pair(complex_rows, split, name)
                    bounds = name in ACCURACIES and pairs and all(p in low and p in high for p in pairs)
                    per_world.append(
                        (
                            np.array([[values[p] for p in pairs] for values in adapter]),
                            np.array([low[p] for p in pairs]) if bounds else None,
                            np.array([high[p] for p in pairs]) if bounds else None,
                        )
                    )
                if any(a.size == 0 for a, _, _ in per_world):
                    continue
                a_mean = float(np.mean([a.mean() for a, _, _ in per_world]))
                a_boot, lo_boot, hi_boot = np.empty(n_boot), np.empty(n_boot), np.empty(n_boot)
                for b in range(n_boot):
                    a_sum = lo_sum = hi_sum = 0.0
                    for j in rng.integers(0, len(worlds), len(worlds)):
                        a, lo, hi = per_world[j]
                        pick_seeds = rng.integers(0, a.shape[0], a.shape[0])
                        pick_pairs = rng.integers(0, a.shape[1], a.shape[1])
                        a_sum += a[pick_seeds][:, pick_pairs].mean()
                        if lo is not None:
                            lo_sum += lo[pick_pairs].mean()
                            hi_sum += hi[pick_pairs].mean()
                    a_boot[b], lo_boot[b], hi_boot[b] = a_sum / len(worlds), lo_sum / len(worlds), hi_sum / len(worlds)
                entry[split][name] = _interval(a_mean, a_boot)
                if any(lo is None for _, lo, _ in per_world):
                    continue
                lo_mean = float(np.mean([lo.mean() for _, lo, _ in per_world]))
                hi_mean = float(np.mean([hi.mean() for _, _, hi in per_world]))
                if abs(hi_mean - lo_mean) < min_gap:
                    entry[split][f"gap_{name}"] = None
                    continue
                spread = np.where(np.abs(hi_boot - lo_boot) < 1e-9, np.nan, hi_boot - lo_boot)
                gap_boot = (a_boot - lo_boot) / spread
                gap = (a_mean - lo_mean) / (hi_mean - lo_mean)
                entry[split][f"gap_{name}"] = _interval(gap, gap_boot[np.isfinite(gap_boot)])
                gaps = {w: (own[w].get(step, {}).get(split, {}).get(f"gap_{name}") or {}).get("mean") for w in worlds}
                gaps = {w: g for w, g in gaps.items() if g is not None}
                if gaps:
                    worst = min(gaps, key=gaps.get)
                    entry["worst"][split][f"gap_{name}"] = {"split_seed": worst, "mean": gaps[worst]}
        summary[step] = entry
    return summary


def breakdown(rows: Sequence[dict], group_of: Callable[[str], str], split: str) -> dict[str, dict[str, float]]:
    """Per group (e.g. each held-out object, or each shape) of one split's per-image rows: the mean of every rate
    and the image count, ``{group: {"images": n, "color_accuracy": ..., "valid_image": ...}}``.
    ``group_of(prompt_id)`` names a row's group."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["category"] == split:
            groups.setdefault(group_of(row["prompt_id"]), []).append(row)
    return {
        group: {
            "images": len(members),
            **{m: float(np.mean([r[m] for r in members])) for m in RATES if m in members[0]},
        }
        for group, members in sorted(groups.items())
    }


def _interval(mean: float, boot: np.ndarray) -> dict[str, float]:
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return {"mean": mean, "lo": float(lo), "hi": float(hi)}


def fmt(cell: dict | None) -> str:
    """``0.94 [0.85, 1.02]``, or – for a missing cell."""
    return "–" if not cell else f"{cell['mean']:.2f} [{cell['lo']:.2f}, {cell['hi']:.2f}]"


def converged_step(summary: dict, split: str, name: str, tolerance: float = 0.05) -> int | None:
    """The first step from which the curve's mean stays within ``tolerance`` of its final value (where it has
    flattened), or None with fewer than two steps or when it is still moving at the last one."""
    steps = sorted(summary)
    values = [(summary[s][split].get(name) or {}).get("mean") for s in steps]
    if len(steps) < 2 or any(v is None for v in values):
        return None
    if abs(values[-1] - values[-2]) > tolerance:
        return None
    first = len(steps) - 1
    while first > 0 and abs(values[first - 1] - values[-1]) <= tolerance:
        first -= 1
    return steps[first]


SECONDS_TICKS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400)


def chart(
    curves: dict[str, dict],
    splits: Sequence[str],
    path: str | Path,
    x: str = "step",
    metrics: Sequence[str] = ("gap_color_accuracy", "gap_shape_accuracy", "gap_count_accuracy", "valid_image"),
) -> Path:
    """One panel per (split, metric): each row's curve against ``x`` ("step" or "train_seconds"), log-scaled,
    with its 95 % band. ``curves``: ``{row name: summarise(...)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    # tab20 keeps a dozen rows apart (the default cycle repeats after ten); solid lines first, then dashed.
    palette = plt.get_cmap("tab20").colors
    styles = {name: (palette[(2 * i) % 20 + (i // 10) % 2], "-" if i < 10 else "--") for i, name in enumerate(curves)}
    fig, axes = plt.subplots(len(splits), len(metrics), figsize=(3.6 * len(metrics), 2.9 * len(splits)), squeeze=False)
    for i, split in enumerate(splits):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            ticks: set[float] = set()
            for name, summary in curves.items():
                steps = [s for s in sorted(summary) if summary[s][split].get(metric)]
                if not steps:
                    continue
                xs = [s if x == "step" else summary[s]["train_seconds"] for s in steps]
                # Steps are the export points; seconds get round numbers in the range.
                ticks.update(xs if x == "step" else [t for t in SECONDS_TICKS if min(xs) / 1.5 <= t <= max(xs) * 1.5])
                cells = [summary[s][split][metric] for s in steps]
                color, style = styles[name]
                ax.plot(xs, [c["mean"] for c in cells], marker="o", ms=3, color=color, ls=style, label=name)
                ax.fill_between(xs, [c["lo"] for c in cells], [c["hi"] for c in cells], color=color, alpha=0.12)
            if not ax.lines:
                # A gap is undefined where base + simple already matches base + complex (counts on some splits).
                ax.text(
                    0.5,
                    0.5,
                    "undefined: the base's two\ncolumns do not differ",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=8,
                    color="grey",
                )
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_xscale("log")
                ax.axhline(0, color="black", lw=0.6)
                ax.axhline(1, color="grey", lw=0.6, ls="--")
                ax.xaxis.set_minor_formatter(NullFormatter())
                if ticks:
                    ax.set_xticks(sorted(ticks))
                    ax.xaxis.set_major_formatter(ScalarFormatter())
                    ax.tick_params(axis="x", labelsize=7)
            ax.set_title(
                f"{split.replace('_', ' ')}: {metric.replace('gap_', 'gap ').replace('_accuracy', '')}", fontsize=9
            )
            if i == len(splits) - 1:
                ax.set_xlabel("training steps" if x == "step" else "training seconds (2 CPU cores)")
    handles = {line.get_label(): line for ax in axes.flat for line in ax.lines if not line.get_label().startswith("_")}
    # Outside the panels: inside one it hides that panel's curves.
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(
        "Toy world: share of the base's simple-vs-complex gap closed (mean over seeds, 95 % band)", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
