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

Shared history: FROM may be a copy of INTO that went on (two device calls that each resumed the committed run).
Its leading invocations that equal INTO's, entry for entry in env.json, are history both hold: their configs and
rows are not copied again (each such row must be in INTO as it is in FROM, or the merge is refused), only what
FROM added after them moves. A row FROM added for a case of that history (a ``retry=`` re-run) is kept, after
the older row, as a resume would keep it. Log files identical at the same place in both are not copied again; a
second FROM of the same name gets ``from-<name>-2``.

Refused before anything is written, naming the folder or the case: a FROM that is not a run folder, a case that
both measured after their shared history (a merge never decides which measurement wins: re-run it with
``retry=``), a shared-history row of FROM that INTO does not hold, or files of an older attnbench without
per-invocation env.json entries. FROM is left as it was.
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


def shared_history(into: Path, source: Path) -> int:
    """How many leading invocations INTO and FROM hold alike (equal env.json entries): FROM resumed a copy of
    INTO; 0 for folders written apart."""
    if not into.exists():
        return 0
    ours = envinfo.read_env(into).get("invocations") or []
    theirs = envinfo.read_env(source).get("invocations") or []
    shared = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        shared += 1
    return shared


def _is_history(row: dict, shared: int) -> bool:
    return row.get("invocation") is not None and int(row["invocation"]) < shared


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


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
    shared = shared_history(into, source)
    for name in ROW_LOGS:
        ours_all = _jsonl(into / name)
        theirs = _jsonl(source / name)
        history = {_key(row) for row in ours_all if _is_history(row, shared)}
        missing = [row for row in theirs if _is_history(row, shared) and _key(row) not in history]
        if missing:
            raise MergeError(f"{name}: {len(missing)} row(s) of the {shared} invocation(s) {str(into)!r} and "
                             f"{str(source)!r} share are not in {str(into)!r} as they are in {str(source)!r} "
                             f"(first: {missing[0].get('case_id')}); the folders do not share that history")
        ours = {row.get("case_id") for row in ours_all if not _is_history(row, shared)}
        added = {row.get("case_id") for row in theirs if not _is_history(row, shared)}
        both = sorted(ours & added - {None})
        if both:
            raise MergeError(f"{name}: {len(both)} case(s) have rows in both {str(into)!r} and {str(source)!r} "
                             f"(first: {both[0]}); a merge does not choose between measurements")


def merge_into(into: Path, source: Path) -> dict:
    """Fold ``source`` into ``into`` (module docstring); returns counts of what moved."""
    into, source = Path(into), Path(source)
    check(into, source)
    shared = shared_history(into, source)
    into.mkdir(parents=True, exist_ok=True)
    env, extra = envinfo.read_env(into), envinfo.read_env(source)
    offset = len(env.get("invocations") or []) - shared  # FROM's invocation k >= shared becomes k + offset
    moved = {"invocations": len(extra.get("invocations") or []) - shared, "shared": shared,
             "rows.jsonl": 0, "quality.jsonl": 0, "skipped": []}

    for name in ROW_LOGS:
        rows = [row for row in _jsonl(source / name, moved["skipped"]) if not _is_history(row, shared)]
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
            if index < shared:
                continue  # INTO holds it
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
        env["invocations"] = [*env["invocations"], *extra["invocations"][shared:]]
        env["commands"] = [*(env.get("commands") or []), *(extra.get("commands") or [])[shared:]]
        env["run_id"] = into.name
        env["finished_at"] = max(filter(None, [env.get("finished_at"), extra.get("finished_at")]), default=None)
        envinfo.summarize_invocations(env)
        env["merged_from"] = [*(env.get("merged_from") or []),
                              {"folder": source.name, "invocations": [shared + offset,
                                                                      shared + offset + moved["invocations"] - 1],
                               **({"shared_invocations": shared} if shared else {})}]
        (into / "env.json").write_text(json.dumps(env, indent=1, default=str))

    for folder in COPIED_FOLDERS:
        if (source / folder).is_dir():
            _copy_new_files(source / folder, into / folder, source.name)

    if moved["rows.jsonl"]:
        store.RowStore(into).finalize()
    if moved["quality.jsonl"]:
        quality.QualityStore(into).finalize()
    return moved


def _copy_new_files(source: Path, into: Path, name: str) -> None:
    """``source``'s files under ``into/from-<name>/`` (``from-<name>-2`` ... when an earlier FROM of that name is
    there), leaving out those identical at the same place in ``into`` (the shared history's logs)."""
    new = [p for p in sorted(source.rglob("*")) if p.is_file()
           and not ((into / p.relative_to(source)).is_file()
                    and (into / p.relative_to(source)).read_bytes() == p.read_bytes())]
    if not new:
        return
    target, n = into / f"from-{name}", 1
    while target.exists():
        n += 1
        target = into / f"from-{name}-{n}"
    for path in new:
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)


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
            print(f"merged {source} into {args.into}: {moved['invocations']} invocation(s)"
                  + (f" after {moved['shared']} shared" if moved["shared"] else "") + ", "
                  f"{moved['rows.jsonl']} kernel row(s), {moved['quality.jsonl']} task row(s)")
            for line in moved["skipped"]:
                print(f"  skipped {source}/{line}")
    except MergeError as exc:
        print(f"attnbench merge: error: {exc}", file=sys.stderr)
        return 2
    return 0
