"""One table and one plot from a Hydra multirun folder: the swept keys against each job's final metrics.

    python -m sur_lightning.sweep_report outputs/demo/multiruns/2026-12-01_23-50-00
    python -m sur_lightning.sweep_report DIR --metrics val/denoising eval/adapter/color_accuracy

Each job folder (``0/``, ``1/``, ...) holds ``.hydra/overrides.yaml`` (what was swept) and, once it finished,
``metrics.json`` (written by ``sur_lightning.train``: the final losses, and the toy-world accuracies and gap
closed when the evaluation callback ran). A job without ``metrics.json`` is listed as unfinished, never dropped.
Writes ``sweep_report.md``, ``sweep_report.csv`` and ``sweep_report.png`` into DIR (or ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

# Shown first when present; every other final metric follows in name order.
PREFERRED = ("val/denoising", "train/loss", "train/denoising")
NOT_METRICS = ("global_step", "epoch")


def override_items(overrides: list[str]) -> dict[str, str]:
    """``["+experiment=demo", "connector=ella"]`` -> ``{"experiment": "demo", "connector": "ella"}``."""
    items = {}
    for override in overrides:
        key, _, value = override.partition("=")
        items[key.lstrip("+~")] = value
    return items


def read_jobs(folder: str | Path) -> list[dict]:
    """``{"job", "overrides", "metrics" (None when unfinished)}`` for every job folder under ``folder``, in job order."""
    import yaml

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {folder}")
    jobs = []
    for overrides_file in folder.glob("**/.hydra/overrides.yaml"):
        job = overrides_file.parent.parent
        metrics_file = job / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics_file}: not valid JSON ({error.msg})") from None
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        jobs.append({"job": str(job.relative_to(folder)), "overrides": override_items(overrides), "metrics": metrics})
    if not jobs:
        raise FileNotFoundError(
            f"{folder} holds no Hydra job folders (no */.hydra/overrides.yaml): pass a multirun folder"
        )
    return sorted(jobs, key=lambda j: (len(j["job"]), j["job"]))


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys]
    return [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]


def metric_names(jobs: list[dict], requested: list[str] | None = None) -> list[str]:
    finished = [job["metrics"] for job in jobs if job["metrics"]]
    if requested:
        missing = [m for m in requested if not any(m in metrics for metrics in finished)]
        if missing:
            known = sorted({k for metrics in finished for k in metrics})
            raise KeyError(f"no job has metric(s) {missing}; known: {known}")
        return list(requested)
    names = sorted(
        {k for metrics in finished for k, v in metrics.items() if isinstance(v, (int, float))} - set(NOT_METRICS)
    )
    return [m for m in PREFERRED if m in names] + [m for m in names if m not in PREFERRED]


def table_rows(jobs: list[dict], keys: list[str], metrics: list[str]) -> list[dict]:
    rows = []
    for job in jobs:
        row = {"job": job["job"], **{k: job["overrides"].get(k, "") for k in keys}}
        values = job["metrics"]
        row["status"] = "finished" if values is not None else "unfinished (no metrics.json)"
        row["step"] = values.get("global_step", "") if values else ""
        row.update({m: values.get(m, "") if values else "" for m in metrics})
        rows.append(row)
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], keys: list[str], metrics: list[str], path: Path, max_metrics: int = 6) -> Path | None:
    """One bar panel per metric (up to ``max_metrics``), one bar per finished job, labelled by its swept values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [row for row in rows if row["status"] == "finished"]
    shown = metrics[:max_metrics]
    if not finished or not shown:
        return None
    labels = [", ".join(f"{k}={row[k]}" for k in keys) or row["job"] for row in finished]
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(6, 0.9 * len(finished) + 2), 2.6 * len(shown)), squeeze=False)
    for ax, metric in zip(axes[:, 0], shown):
        values = [row[metric] if isinstance(row[metric], (int, float)) else float("nan") for row in finished]
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_report(folder: str | Path, metrics: list[str] | None = None, out: str | Path | None = None) -> dict:
    """Read a multirun folder and write its table (markdown, CSV) and plot; returns paths and rows."""
    folder = Path(folder)
    out = Path(out) if out else folder
    out.mkdir(parents=True, exist_ok=True)
    jobs = read_jobs(folder)
    keys = swept_keys(jobs)
    names = metric_names(jobs, metrics)
    rows = table_rows(jobs, keys, names)
    columns = ["job", *keys, "status", "step", *names]
    md_path, csv_path = out / "sweep_report.md", out / "sweep_report.csv"
    unfinished = sum(row["status"] != "finished" for row in rows)
    header = (
        f"# Sweep {folder}\n\n{len(rows)} jobs, {unfinished} unfinished; swept: {', '.join(keys) or 'nothing'}.\n\n"
    )
    md_path.write_text(header + markdown(rows, columns) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    png_path = plot(rows, keys, names, out / "sweep_report.png")
    return {"rows": rows, "columns": columns, "swept": keys, "markdown": md_path, "csv": csv_path, "plot": png_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a Hydra multirun folder (outputs/<task>/multiruns/<time>)")
    parser.add_argument("--metrics", nargs="+", default=None, help="metrics to show (default: every final metric)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the folder)")
    args = parser.parse_args()
    report = sweep_report(args.folder, args.metrics, args.out)
    print(markdown(report["rows"], report["columns"]))
    written = [report["markdown"], report["csv"]] + ([report["plot"]] if report["plot"] else [])
    print("\nwrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
