"""Collect a Hydra multirun folder into a markdown table: one row per job, its overrides and final metrics.

    python experiments/eta_loss_sweep/analyze.py outputs/demo/multiruns/<date>_<time> [--metrics val/denoising train/eta_mean]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def collect(sweep_dir: Path, keys: list[str] | None) -> list[dict]:
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name)):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        metrics = json.loads(metrics_file.read_text())
        rows.append({"job": metrics_file.parent.name, "overrides": overrides, "metrics": metrics})
    missing = [p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit() and not (p / "metrics.json").exists()]
    if missing:
        print(f"warning: jobs without metrics.json (failed or still running): {', '.join(sorted(missing))}")
    return rows


def markdown(rows: list[dict], keys: list[str], swept: list[str]) -> str:
    header = ["job", *swept, *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        chosen = dict(o.split("=", 1) for o in row["overrides"] if "=" in o)
        cells = [row["job"], *(chosen.get(k, "") for k in swept)]
        cells += [f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "—" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metrics", nargs="+", default=["val/denoising", "train/denoising", "train/prompt", "train/llm", "train/eta_mean"])
    parser.add_argument("--swept", nargs="+", default=["eta", "loss"], help="override keys that vary across jobs")
    args = parser.parse_args()
    rows = collect(args.sweep_dir, args.metrics)
    if not rows:
        raise SystemExit(f"no */metrics.json under {args.sweep_dir}")
    print(markdown(rows, args.metrics, args.swept))


if __name__ == "__main__":
    main()
