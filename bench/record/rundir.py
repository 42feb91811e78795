"""Run folders: load one (rows, resolved config, environment) and merge several.

A run folder ``results/<run_id>/`` holds ``rows.parquet`` (authoritative when present), ``rows.csv``, the
crash-safe append log ``rows.jsonl``, ``config.yaml`` and ``env.json`` (DESIGN.md §2, §6). Any of them may be
missing: a folder with no rows file loads as a run with zero rows; a missing config or environment loads as
an empty mapping. Rows always come back typed with every column of ``bench.schema.COLUMNS`` (extra columns of
later issues are kept after them).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from attnbench.record.schema import to_frame
from attnbench.record.store import InvocationOptions, read_jsonl

ROW_FILES = ("rows.parquet", "rows.jsonl", "rows.csv")


class RunDirError(Exception):
    """A run folder that does not exist or a file in it that cannot be read; the message names the path."""


class UsageError(Exception):
    """A bad command-line argument; the message names it (the CLIs exit with code 2)."""


@dataclass
class Run:
    rows: pd.DataFrame
    config: dict
    env: dict
    path: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def device(self) -> str:
        """Device name from env.json, else the most common device of the rows, else "not recorded"."""
        device = self.env.get("device")
        if not device:
            gpus = self.env.get("gpus") or []
            device = gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None
        if not device and len(self.rows) and self.rows["device"].notna().any():
            device = self.rows["device"].mode().iloc[0]
        return str(device) if device else "not recorded"


def is_run_dir(path: Path) -> bool:
    """True when the folder holds a rows file, a config or an environment record."""
    return path.is_dir() and any((path / name).exists() for name in (*ROW_FILES, "config.yaml", "env.json"))


def load_run(path: str | Path) -> Run:
    """Load a run folder. Raises RunDirError when the folder is missing or a present file is unreadable.

    Rows come from rows.parquet when present, else rows.jsonl (a truncated line, as a crash leaves it, is
    skipped with a warning; when a case appears twice the later line wins), else rows.csv.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run folder not found: {path}")
    warnings: list[str] = []
    rows = _read_rows(path, warnings)
    if len(rows):
        rows["run_id"] = rows["run_id"].fillna(path.name)
    _check_plan(path, rows, warnings)
    _fill_method_options(path, rows)
    return Run(rows=rows, config=_read_config(path), env=_read_env(path), path=path, warnings=warnings)


def _fill_method_options(path: Path, rows: pd.DataFrame) -> None:
    """Rows written before the ``method_options`` column existed get their method's options from
    ``config.<invocation>.yaml`` of the invocation that wrote them (``InvocationOptions``; left empty where
    that cannot be told)."""
    if not len(rows) or "invocation" not in rows:
        return
    if "method_options" not in rows:
        rows["method_options"] = pd.Series([None] * len(rows), dtype="string")
    missing = rows["method_options"].isna() & rows["invocation"].notna()
    options_of = InvocationOptions(path)
    for index in rows.index[missing]:
        options = options_of.row_options({"method": rows.at[index, "method"],
                                          "invocation": int(rows.at[index, "invocation"])})
        if options:
            rows.at[index, "method_options"] = json.dumps(options, sort_keys=True, default=str)


def _check_plan(path: Path, rows: pd.DataFrame, warnings: list[str]) -> None:
    """Warn when planned cases have no row (an interrupted run): they are missing, never filled in."""
    plan_path = path / "plan.json"
    if not plan_path.is_file():
        return
    try:
        planned = set(json.loads(plan_path.read_text()).get("case_ids") or [])
    except (OSError, ValueError):
        warnings.append("plan.json is unreadable")
        return
    recorded = set(rows["case_id"].dropna()) if len(rows) else set()
    missing = planned - recorded
    if missing:
        warnings.append(
            f"{len(missing)} of {len(planned)} planned cases have no row: the run was interrupted; running the "
            f"same command with run_id={path.name} resumes it"
        )


def merge_runs(runs: list[Run], one_source: bool = False) -> pd.DataFrame:
    """All rows of several runs in one frame, with two added columns.

    ``run_dir``: the run folder's name. ``source``: how lines from this run are labelled in a merged report:
    empty for a single run (and for every run with ``one_source``: the runs are one comparison); the device
    when every run has its own device; the run folder when all runs share one device; "device · run"
    otherwise. Rows without a device get the run's device.
    """
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise RunDirError(f"the same run folder is given twice: {sorted(n for n in names if names.count(n) > 1)[0]}")
    devices = [run.device for run in runs]
    frames = []
    for run, device in zip(runs, devices):
        frame = run.rows.copy()
        frame["device"] = frame["device"].fillna(device)
        frame["run_dir"] = run.name
        frame["source"] = "" if one_source else _source_label(run.name, device, devices, len(runs))
        frames.append(frame)
    if not frames:
        return to_frame([])
    merged = pd.concat(frames, ignore_index=True)
    return merged.astype({"run_dir": "string", "source": "string"})


def _source_label(name: str, device: str, devices: list[str], n_runs: int) -> str:
    if n_runs == 1:
        return ""
    if len(set(devices)) == n_runs:
        return device
    if len(set(devices)) == 1:
        return name
    return f"{device} · {name}"


def _read_rows(path: Path, warnings: list[str]) -> pd.DataFrame:
    parquet, jsonl, csv = (path / name for name in ROW_FILES)
    try:
        if parquet.exists():
            try:
                return to_frame(pd.read_parquet(parquet).to_dict("records"))
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types on a damaged file
                if not jsonl.exists():
                    raise RunDirError(f"cannot read rows of {path}: {parquet.name}: {exc}") from exc
                warnings.append(f"{parquet.name} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); rows read "
                                f"from {jsonl.name}")
        if jsonl.exists():
            return _read_jsonl(jsonl, warnings)
        if csv.exists():
            frame = pd.read_csv(csv, keep_default_na=True)
            return to_frame(frame.astype(object).where(frame.notna(), None).to_dict("records"))
    except (OSError, ValueError, TypeError) as exc:
        raise RunDirError(f"cannot read rows of {path}: {exc}") from exc
    return to_frame([])


def _read_jsonl(jsonl: Path, warnings: list[str]) -> pd.DataFrame:
    """Rows of rows.jsonl: lines that are unreadable or not rows are skipped with a warning naming the line; when
    a case appears twice the later line wins."""
    frame = to_frame(read_jsonl(jsonl, warnings))
    if len(frame):
        frame = frame.drop_duplicates("case_id", keep="last").sort_index().reset_index(drop=True)
    return frame


def _read_config(path: Path) -> dict:
    config = path / "config.yaml"
    if not config.exists():
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"cannot read {config}: {exc}") from exc
    return loaded if isinstance(loaded, dict) else {}


def _read_env(path: Path) -> dict:
    env = path / "env.json"
    if not env.exists():
        return {}
    try:
        loaded = json.loads(env.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read {env}: {exc}") from exc
    return loaded if isinstance(loaded, dict) else {}


# config keys whose values span the cases: a resumed run's merged config.yaml holds the union of their values
AXES = ("methods", "masks", "seq_lens", "cross_lens", "batch", "tokens", "heads_q", "heads_kv", "head_dim", "dtype",
        "modes", "layout", "seed", "decode_queries")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def merge_configs(earlier: dict, later: dict) -> tuple[dict, list[str]]:
    """The config of a run written by two invocations: axis keys (``AXES``) hold the ordered union of both
    values (a scalar becomes a list when they differ), so the merged view covers every case either planned;
    any other key that differs keeps the later value. Returns (merged, notes on each key that differed)."""
    merged = dict(earlier)
    notes = []
    for key, value in later.items():
        if key not in earlier or earlier[key] == value or key == "run_id":
            merged[key] = value
            continue
        if key in AXES:
            union, seen = [], set()
            for item in _as_list(earlier[key]) + _as_list(value):
                marker = json.dumps(item, sort_keys=True, default=str)
                if marker not in seen:
                    seen.add(marker)
                    union.append(item)
            if union != _as_list(earlier[key]) or not isinstance(earlier[key], (list, tuple)):
                merged[key] = union
                notes.append(f"{key}: union of {earlier[key]!r} and {value!r}")
        else:
            merged[key] = value
            notes.append(f"{key}: {earlier[key]!r} then {value!r} (latest kept)")
    return merged, notes


MERGED_HEADER = "# merged view of"


def write_config(run_dir: Path, cfg: dict, invocation: int) -> None:
    """``config.<invocation>.yaml``: this invocation's resolved config, as given; ``config.yaml``: the merged
    view of every invocation's config (``merge_configs``), with a header naming the keys that differed.

    A folder of an older attnbench (``config.yaml`` of its last invocation, ``config.<timestamp>.yaml`` of
    earlier ones) keeps them: its ``config.yaml`` becomes ``config.legacy.yaml`` and all join the merge."""
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    merged_path = run_dir / "config.yaml"
    if merged_path.is_file() and not merged_path.read_text().startswith(MERGED_HEADER):
        merged_path.rename(run_dir / "config.legacy.yaml")
    (run_dir / f"config.{invocation}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    parts = [(path, path.name[len("config."):-len(".yaml")]) for path in run_dir.glob("config.*.yaml")]
    older = sorted(path for path, middle in parts if not middle.isdigit())  # timestamps, then legacy
    numbered = [path for path, middle in sorted((p for p in parts if p[1].isdigit()), key=lambda p: int(p[1]))]
    merged, notes = None, []
    for path in older + numbered:
        loaded = yaml.safe_load(path.read_text()) or {}
        if merged is None:
            merged = loaded
            continue
        merged, changed = merge_configs(merged, loaded)
        notes += [f"{path.name}: {note}" for note in changed]
    header = [f"{MERGED_HEADER} {', '.join(p.name for p in older + numbered)}:",
              "# axis keys hold the union of every invocation's values (so a value here may not be one that a",
              "# single invocation could be given); other keys hold the latest value."]
    header += [f"#   {note}" for note in notes]
    merged_path.write_text("\n".join(header) + "\n" + yaml.safe_dump(merged, sort_keys=False))


def resolve_run(arg: str, results_dir: Path, name: str = "RUN") -> Path:
    """A run argument as a folder: the path itself, else ``results_dir/arg``; UsageError naming ``name``."""
    path = Path(arg)
    if path.is_dir():
        return path
    if (results_dir / arg).is_dir():
        return results_dir / arg
    raise UsageError(f"{name} {arg!r}: run folder not found (looked at {path} and {results_dir / arg})")


def load_runs(args: list[str], results_dir: Path, names: list[str] | None = None) -> list[Run]:
    """Load run folders named on a command line; UsageError names the first missing or unreadable one."""
    runs = []
    for arg, name in zip(args, names or ["RUN"] * len(args)):
        try:
            runs.append(load_run(resolve_run(arg, results_dir, name)))
        except RunDirError as exc:
            raise UsageError(f"{name} {arg!r}: {exc}") from exc
    return runs


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """argparse without exiting: the namespace, or the exit code argparse asked for (2 on a bad argument)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


__all__ = ["ROW_FILES", "Run", "RunDirError", "UsageError", "is_run_dir", "load_run", "load_runs", "merge_configs",
           "merge_runs", "parse_args", "resolve_run", "write_config"]
