"""The result store of one run folder: ``rows.jsonl`` (append-only, crash-safe) → rows.parquet / rows.csv.

``append`` writes one JSON line and fsyncs, so a row is on disk the moment its case finishes; ``done`` is
the set of case ids already recorded (the resume set); ``finalize`` writes the tidy tables.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

from attnbench.record import schema as schema


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write: its case runs again
    return rows


class RowStore:
    def __init__(self, run_dir: Path, retry: tuple[str, ...] = ()):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "rows.jsonl"
        self._lock = threading.Lock()
        self._drop_partial_line()
        self.rows = read_jsonl(self.path)
        # cases whose latest row has a status in ``retry`` run again on resume
        latest = {row["case_id"]: row["status"] for row in self.rows if row.get("case_id")}
        self.done = {case_id for case_id, status in latest.items() if status not in retry}

    def _drop_partial_line(self) -> None:
        """A crash mid-write leaves a last line without its newline: cut it, so the next row starts clean."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def append(self, row: dict) -> None:
        row = {key: _clean(value) for key, value in row.items()}
        if row.get("status") not in schema.STATUSES:
            raise ValueError(f"row has status {row.get('status')!r}, not one of {schema.STATUSES}")
        if row["status"] != "ok" and not row.get("reason"):
            raise ValueError(f"row with status {row['status']!r} has no reason")
        with self._lock:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.rows.append(row)
            self.done.add(row["case_id"])

    def frame(self):
        # the latest row of a case wins (a resumed run may re-run a case whose line was cut short)
        latest = {row["case_id"]: row for row in self.rows}
        return schema.to_frame(latest.values())

    def finalize(self) -> Path:
        frame = self.frame()
        frame.to_parquet(self.run_dir / "rows.parquet", index=False)
        frame.to_csv(self.run_dir / "rows.csv", index=False)
        return self.run_dir / "rows.parquet"
