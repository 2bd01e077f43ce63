"""What the data pipeline did to rows that were not clean: skipped, repaired or truncated, each with its reason.

Nothing is dropped silently. A row is named by where it came from (``metadata.jsonl:12``,
``train-0000.parquet row 7``, ``shard-000003.tar/000042``) and by its id. The report is written as
``data_report.json`` beside the run and put into the W&B run summary.

    {"counts": {"rows": 26000, "used": 25990, "skipped": 10, "repaired": 4, "truncated": 300},
     "skipped":   [{"row": "metadata.jsonl:12", "id": "00011.png", "reason": "file not found"}, ...],
     "repaired":  [{"row": ..., "id": ..., "reason": "converted CMYK to RGB"}, ...],
     "truncated": [{"row": ..., "id": ..., "reason": "complex prompt: 2100 tokens cut to 77"}, ...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KINDS = ("skipped", "repaired", "truncated")


class DataReport:
    """Collects events ``(kind, row, id, reason)``; the same event seen twice (a bad row met every epoch) counts once."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        self.seen: set[tuple[str, str, str]] = set()
        self.rows = 0
        self.folder: str | None = None  # the folder whose metadata was read, when the data is a folder
        self.balanced: dict | None = None  # data.balance_by: the column, its rows per value and each value's share

    def add(self, kind: str, row: str, id: str, reason: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown data event kind {kind!r}; expected one of {KINDS}")
        if (kind, row, reason) in self.seen:
            return
        self.seen.add((kind, row, reason))
        self.events[kind].append({"row": row, "id": id, "reason": reason})

    def skip(self, row: str, id: str, reason: str) -> None:
        self.add("skipped", row, id, reason)

    def repair(self, row: str, id: str, reason: str) -> None:
        self.add("repaired", row, id, reason)

    def truncate(self, row: str, id: str, reason: str) -> None:
        self.add("truncated", row, id, reason)

    def extend(self, events: list[dict]) -> None:
        """Add events recorded elsewhere (a dataloader worker), as ``{"kind", "row", "id", "reason"}`` dicts."""
        for event in events:
            self.add(event["kind"], event["row"], event["id"], event["reason"])

    def skipped_rows(self) -> set[str]:
        return {event["row"] for event in self.events["skipped"]}

    def to_dict(self) -> dict:
        skipped = len(self.skipped_rows())
        counts = {"rows": self.rows, "used": max(self.rows - skipped, 0)}
        counts.update({kind: len({e["row"] for e in self.events[kind]}) for kind in KINDS})
        folder = {"folder": self.folder} if self.folder else {}
        balanced = {"balanced": self.balanced} if self.balanced else {}
        return {**folder, "counts": counts, **balanced, **{kind: list(self.events[kind]) for kind in KINDS}}

    def write(self, path: str | Path) -> Path:
        """Write the report atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        os.replace(tmp, path)
        return path

    def log_to(self, loggers) -> None:
        """Counts as metrics for every logger; W&B also gets every skipped row with its reason in the run summary."""
        report = self.to_dict()
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                summary = logger.experiment.summary
                for name, value in report["counts"].items():
                    summary[f"data/{name}"] = value
                summary["data/skipped_rows"] = report["skipped"]
                # Truncations can be thousands of long SURD prompts: the JSON report lists them all.
                summary["data/repaired_rows"] = report["repaired"]
            else:
                logger.log_metrics({f"data/{name}": float(value) for name, value in report["counts"].items()})

    def __str__(self) -> str:
        counts = self.to_dict()["counts"]
        text = ", ".join(f"{name} {value}" for name, value in counts.items())
        lines = [f"data: {text}" + (f" (from {self.folder})" if self.folder else "")]
        for event in self.events["skipped"][:20]:
            lines.append(f"  skipped {event['row']} ({event['id']}): {event['reason']}")
        if len(self.events["skipped"]) > 20:
            lines.append(f"  ... and {len(self.events['skipped']) - 20} more skipped rows (see data_report.json)")
        return "\n".join(lines)
