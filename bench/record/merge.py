"""``attnbench merge INTO FROM [FROM ...]``: fold run folders that were written apart (two device calls that each
started the same run from nothing, the nodes of a cluster job, a step re-run elsewhere) into one folder, as if
FROM's invocations had resumed INTO one after another.

What moves, per FROM folder (DESIGN.md §2, §6):
  * env.json: FROM's invocations are appended to INTO's; each row's ``invocation`` index is shifted by the
    number INTO had, so it still names the command, host and versions that wrote it. The top-level facts follow
    the latest invocation that wrote rows, and ``mixed`` lists the facts on which the invocations differ, as a
    resume would leave them (``envinfo.end_invocation``).
  * config.<k>.yaml / train_config.<k>.yaml: renumbered the same way; config.yaml is rebuilt as the merged view.
  * plan.json: the union of the planned case ids.
  * rows.jsonl and quality.jsonl: appended, then rows.parquet / quality.parquet and the csv files rewritten; a
    line cut short by a crash is left out (as a resume reads it: its case runs again) and named in the output.
  * logs/ and device-logs/: copied under ``<folder>/from-<FROM's name>/``.

INTO need not exist: ``attnbench merge results/all results/a results/b`` makes it from a and b.
Refused before anything is written, naming the folder or the case: a FROM that is not a run folder, a case that
has a row in both (a merge never decides which measurement wins: re-run it with ``retry=``), or files of an
older attnbench without per-invocation env.json entries. FROM is left as it was.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from attnbench.record import envinfo, quality, store
from attnbench.record.rundir import is_run_dir, parse_args, write_config

ROW_LOGS = {"rows.jsonl": "kernel", "quality.jsonl": "task"}
COPIED_FOLDERS = ("logs", "device-logs")


class MergeError(ValueError):
    """A merge that would lose or mix up data; the message names the folder or case."""


def _jsonl(path: Path, skipped: list[str] | None = None) -> list[dict]:
    """The rows of a rows.jsonl / quality.jsonl as their stores read them on resume: a line cut short by a crash
    (or, in rows.jsonl, a line that is not a row) is skipped, and named in ``skipped``; its case runs again
    when the merged run is resumed."""
    if path.name == "rows.jsonl":
        return store.read_jsonl(path, skipped)
    return quality.read_jsonl(path, skipped)


def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    found = {}
    for path in folder.glob(f"{prefix}*.yaml"):
        middle = path.name[len(prefix):-len(".yaml")]
        if middle.isdigit():
            found[int(middle)] = path
    return found


def check(into: Path, source: Path) -> None:
    """Every reason to refuse, before any file is touched."""
    for name, folder in (("INTO", into), ("FROM", source)):
        if name == "INTO" and not folder.exists():
            continue  # created by the merge
        if not is_run_dir(folder):
            raise MergeError(f"{name} {str(folder)!r} is not a run folder (no rows, config.yaml or env.json)")
    if into.exists() and into.resolve() == source.resolve():
        raise MergeError(f"FROM {str(source)!r} is INTO itself")
    for folder in (into, source):
        env = envinfo.read_env(folder)
        if env and "invocations" not in env:
            raise MergeError(f"{str(folder)!r}: env.json of an older attnbench (no per-invocation entries); "
                             "resume it once with the current attnbench first")
    for name in ROW_LOGS:
        ours = {row.get("case_id") for row in _jsonl(into / name)}
        both = sorted(ours & {row.get("case_id") for row in _jsonl(source / name)} - {None})
        if both:
            raise MergeError(f"{name}: {len(both)} case(s) have rows in both {str(into)!r} and {str(source)!r} "
                             f"(first: {both[0]}); a merge does not choose between measurements")


def merge_into(into: Path, source: Path) -> dict:
    """Fold ``source`` into ``into`` (module docstring); returns counts of what moved."""
    into, source = Path(into), Path(source)
    check(into, source)
    into.mkdir(parents=True, exist_ok=True)
    env, extra = envinfo.read_env(into), envinfo.read_env(source)
    offset = len(env.get("invocations") or [])
    moved = {"invocations": len(extra.get("invocations") or []), "rows.jsonl": 0, "quality.jsonl": 0, "skipped": []}

    for name in ROW_LOGS:
        rows = _jsonl(source / name, moved["skipped"])
        if not rows:
            continue
        with open(into / name, "a") as handle:
            for row in rows:
                if row.get("invocation") is not None:
                    row["invocation"] = int(row["invocation"]) + offset
                if "run_id" in row:
                    row["run_id"] = into.name
                handle.write(json.dumps(row, default=str) + "\n")
        moved[name] = len(rows)

    for prefix, ours in (("config.", True), ("train_config.", False)):
        for index, path in sorted(_numbered(source, prefix).items()):
            cfg = yaml.safe_load(path.read_text()) or {}
            if ours:
                write_config(into, cfg, index + offset)  # also rebuilds the merged config.yaml
            else:
                (into / f"{prefix}{index + offset}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    plan_path, other_plan = into / "plan.json", source / "plan.json"
    if other_plan.is_file():
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
        other = json.loads(other_plan.read_text())
        planned = sorted(set(plan.get("case_ids") or []) | set(other.get("case_ids") or []))
        notes = list(dict.fromkeys([*(plan.get("notes") or []), *(other.get("notes") or [])]))
        plan_path.write_text(json.dumps({"planned": len(planned), "case_ids": planned, **({"notes": notes} if notes else {})}))

    if extra:
        if not env:
            env = {key: value for key, value in extra.items() if key != "invocations"}
            env["invocations"] = []
            env["commands"] = []
        env["invocations"] = [*env["invocations"], *extra["invocations"]]
        env["commands"] = [*(env.get("commands") or []), *(extra.get("commands") or [])]
        env["run_id"] = into.name
        env["finished_at"] = max(filter(None, [env.get("finished_at"), extra.get("finished_at")]), default=None)
        envinfo.summarize_invocations(env)
        env["merged_from"] = [*(env.get("merged_from") or []),
                              {"folder": source.name, "invocations": [offset, offset + moved["invocations"] - 1]}]
        (into / "env.json").write_text(json.dumps(env, indent=1, default=str))

    for folder in COPIED_FOLDERS:
        if (source / folder).is_dir():
            shutil.copytree(source / folder, into / folder / f"from-{source.name}", dirs_exist_ok=True)

    if moved["rows.jsonl"]:
        store.RowStore(into).finalize()
    if moved["quality.jsonl"]:
        quality.QualityStore(into).finalize()
    return moved


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnbench merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("into", type=Path, help="run folder that receives the rows")
    parser.add_argument("sources", type=Path, nargs="+", metavar="from", help="run folder(s) to fold in")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        for i, source in enumerate(args.sources):  # all checked, against INTO and each other, before any is merged
            check(args.into, source)
            for other in args.sources[i + 1:]:
                check(source, other)
        for source in args.sources:
            moved = merge_into(args.into, source)
            print(f"merged {source} into {args.into}: {moved['invocations']} invocation(s), "
                  f"{moved['rows.jsonl']} kernel row(s), {moved['quality.jsonl']} task row(s)")
            for line in moved["skipped"]:
                print(f"  skipped {source}/{line}")
    except MergeError as exc:
        print(f"attnbench merge: error: {exc}", file=sys.stderr)
        return 2
    return 0
