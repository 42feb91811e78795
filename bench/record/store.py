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


_COLUMN_TYPES = {"string": (str,), "Int64": (int,), "Float64": (int, float), "boolean": (bool,)}


def row_problem(obj) -> str | None:
    """Why a parsed JSON line is not a row, or None: a row is an object with a string ``case_id``, a known
    ``status``, and every schema column it holds empty or of the column's type."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    if not isinstance(obj.get("case_id"), str) or not obj["case_id"]:
        return "no case_id"
    if obj.get("status") not in schema.STATUSES:
        return f"status {obj.get('status')!r} is not one of {', '.join(schema.STATUSES)}"
    for name, (dtype, _) in schema.COLUMNS.items():
        value = obj.get(name)
        if value is None:
            continue
        types = _COLUMN_TYPES.get(dtype, (object,))
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"column {name} holds {value!r}, not a {dtype} value"
        if dtype == "Int64" and not -(2**63) <= value < 2**63:
            return f"column {name} holds {value!r}, beyond 64-bit integers"
    return None


def read_jsonl(path: Path, warnings: list[str] | None = None) -> list[dict]:
    """The rows of a ``rows.jsonl``. A line cut short by a crash, or a line that is valid JSON but not a row,
    is skipped; ``warnings`` (when given) gets one line per skipped line, naming it (``rows.jsonl:7: ...``)."""
    rows = []
    if not path.is_file():
        return rows
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if warnings is not None:  # a line cut short by a crash mid-write: its case runs again
                    warnings.append(f"{path.name}:{number}: unreadable line skipped")
                continue
            problem = row_problem(obj)
            if problem:
                if warnings is not None:
                    warnings.append(f"{path.name}:{number}: not a row ({problem}); line skipped")
                continue
            rows.append(obj)
    return rows


def options_json(method_options: dict | None, method: str) -> str | None:
    """The ``method_options`` column: the method's hyper-parameters as canonical JSON (sorted keys), or None
    when the config gives the method none."""
    options = (method_options or {}).get(method)
    return json.dumps(options, sort_keys=True, default=str) if options else None


class InvocationOptions:
    """The method options a row was measured with: its ``method_options`` column, or for rows written before
    that column existed, ``config.<invocation>.yaml`` of the invocation that wrote it (read once each)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._configs: dict[int, dict | None] = {}

    def _config(self, invocation: int) -> dict | None:
        if invocation not in self._configs:
            import yaml

            path = self.run_dir / f"config.{invocation}.yaml"
            try:
                self._configs[invocation] = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None
            except (OSError, yaml.YAMLError):
                self._configs[invocation] = None
        return self._configs[invocation]

    def row_options(self, row: dict) -> dict | None:
        """The options as a dict ({} for none), or None when they cannot be told."""
        recorded = row.get("method_options")
        if isinstance(recorded, str) and recorded:
            return json.loads(recorded)
        if "method_options" in row and (recorded is None or recorded == ""):
            return {}
        invocation = row.get("invocation")
        if invocation is None or (isinstance(invocation, float) and math.isnan(invocation)):
            return None
        config = self._config(int(invocation))
        if config is None:
            return None
        return dict((config.get("method_options") or {}).get(str(row.get("method"))) or {})


class RowStore:
    def __init__(self, run_dir: Path, retry: tuple[str, ...] = (), method_options: dict | None = None):
        # this invocation's method_options: every row appended gets its method's in the ``method_options`` column
        self.method_options = dict(method_options or {})
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "rows.jsonl"
        self._lock = threading.Lock()
        self._drop_partial_line()
        self.warnings: list[str] = []  # lines of rows.jsonl skipped, by line number
        self.rows = read_jsonl(self.path, self.warnings)
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
        if "method_options" not in row or row["method_options"] is None:
            row["method_options"] = options_json(self.method_options, str(row.get("method")))
        with self._lock:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.rows.append(row)
            self.done.add(row["case_id"])

    def recorded_options(self, case_ids: set[str]) -> dict[str, list[dict]]:
        """Per method, every distinct set of method options that the latest rows of ``case_ids`` were measured
        with (``row_options``); rows whose options cannot be told are left out."""
        options_of = InvocationOptions(self.run_dir)
        found: dict[str, list[dict]] = {}
        latest = {row["case_id"]: row for row in self.rows if row.get("case_id") in case_ids}
        for row in latest.values():
            options = options_of.row_options(row)
            if options is None:
                continue
            sets = found.setdefault(str(row.get("method")), [])
            if options not in sets:
                sets.append(options)
        return found

    def frame(self):
        # the latest row of a case wins (a resumed run may re-run a case whose line was cut short)
        latest = {row["case_id"]: row for row in self.rows}
        return schema.to_frame(latest.values())

    def finalize(self) -> Path:
        frame = self.frame()
        frame.to_parquet(self.run_dir / "rows.parquet", index=False)
        frame.to_csv(self.run_dir / "rows.csv", index=False)
        return self.run_dir / "rows.parquet"
