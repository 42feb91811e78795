#!/usr/bin/env python3
"""Fold one device call's returned files into the committed results (the steps every session did by hand).

usage: python scripts/ingest_device_call.py FILES_AT --tag s15 [--results results] [--scratch DIR] [--no-report]
       [--dry-run]

FILES_AT is the folder the device tool copied ``$OUT`` into (``/work/.device/N``): the packed outputs of
``scripts/device_wrap.sh`` (``NAME.tgz``, ``NAME-console.txt``, ``triton-autotune.tgz``) or of
``scripts/device_task_grid.sh`` (``runs.tgz``, ``logs.tgz``, ...). In order:

1. FILES_AT is copied to a scratch folder first (the device tool's folder does not outlive the session).
2. Every archive but ``triton-autotune.tgz`` is unpacked there; every folder holding ``rows.jsonl`` or
   ``quality.jsonl`` is a run, named by its folder.
3. A run the results folder has already is folded in with ``attnbench merge`` (the device call resumed a copy
   of the committed run: the shared history is checked and only the new invocations and rows move; a run that
   measured a case the committed one also measured after their shared history is refused, naming it); a new
   run is copied. Nothing is overwritten.
4. The logs: each step log (a top-level ``*.txt`` of an archive) goes to ``device-logs/TAG/`` of the runs it
   names (its ``run folder: .../RUN`` lines; for a step cut before that line, the run ids it mentions), the
   console logs (``*-console.txt``) to every run the call touched; ``gpu-tests-STEP.txt`` where ``STEP.txt`` went
   (every run when no step log has that name). A committed run the call copied out and returned with no row
   the committed one lacks is left alone (no merge, no logs): listed as unchanged.
5. Each touched run's report is rebuilt (``attnbench report``; ``report.html`` removed: git-ignored, regenerated)
   unless ``--no-report``, and ``triton-autotune.tgz`` is folded into ``scripts/device-cache`` by
   ``scripts/refresh_autotune_cache.sh``.

Prints what it did, run by run (rows before and after, by status). ``--dry-run`` prints the plan only.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ("rows.jsonl", "quality.jsonl")
RUN_LINE = re.compile(r"run folder: (\S+)")


def _statuses(run: Path) -> Counter:
    counts: Counter = Counter()
    for name in RUN_FILES:
        path = run / name
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    counts[json.loads(line).get("status", "?")] += 1
                except ValueError:
                    counts["(cut line)"] += 1
    return counts


def _same_rows(run: Path, committed: Path) -> bool:
    """True when every row of the returned run is already a row of the committed one, line for line: the call
    copied the run out and added nothing (the committed run may have gained rows from an earlier call since)."""
    for name in ("rows.jsonl", "quality.jsonl"):
        if (run / name).is_file():
            if not (committed / name).is_file():
                return False
            have = set((committed / name).read_text().splitlines())
            return all(line in have for line in (run / name).read_text().splitlines())
    return False


def _runs_in(tree: Path) -> list[Path]:
    """Run folders under ``tree`` (a folder holding rows.jsonl or quality.jsonl), outermost first."""
    found = sorted({p.parent for name in RUN_FILES for p in tree.rglob(name)}, key=lambda p: len(p.parts))
    return [run for run in found if not any(other in run.parents for other in found)]


def _safe_extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not str(target).startswith(str(into.resolve())):
                raise SystemExit(f"{archive}: member {member.name!r} would land outside {into}")
        tar.extractall(into)


def ingest(files_at: Path, tag: str, results: Path, scratch: Path, report: bool = True, dry_run: bool = False,
           refresh_cache: bool = True) -> dict:
    if not files_at.is_dir():
        raise SystemExit(f"FILES_AT: {files_at} is not a folder")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise SystemExit(f"--tag: {tag!r} must be a plain folder name (letters, digits, _ . -)")
    copy = scratch / "returned"
    shutil.copytree(files_at, copy, dirs_exist_ok=True)
    unpacked = scratch / "unpacked"
    unpacked.mkdir(parents=True, exist_ok=True)
    archives = sorted(p for p in copy.glob("*.tgz") if p.name != "triton-autotune.tgz")
    if not archives:
        raise SystemExit(f"FILES_AT: {files_at} holds no archive (*.tgz) but the autotune cache")
    step_logs: list[Path] = []
    for archive in archives:
        dest = unpacked / archive.name[:-4]
        dest.mkdir(parents=True, exist_ok=True)
        _safe_extract(archive, dest)
        step_logs += sorted(p for p in dest.glob("*.txt"))
        step_logs += sorted(p for p in dest.glob("logs/*.txt"))
    runs = [run for archive in archives for run in _runs_in(unpacked / archive.name[:-4])]
    names = [run.name for run in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"FILES_AT: run(s) {', '.join(dupes)} come in more than one archive: fold them by hand")
    unchanged = [run for run in runs if _same_rows(run, results / run.name)]
    for run in unchanged:  # a committed run the call copied out and left as it was: nothing to merge, no logs
        runs.remove(run)
        names.remove(run.name)
    consoles = sorted(copy.glob("*-console.txt"))
    plan = {"runs": {}, "logs": {}, "unchanged": [run.name for run in unchanged]}
    for run in runs:
        target = results / run.name
        plan["runs"][run.name] = {"action": "merge" if target.exists() else "copy", "from": str(run),
                                  "before": dict(_statuses(target)) if target.exists() else {}}
    filed: dict[str, set[str]] = {}
    for log in sorted(step_logs, key=lambda p: p.name.startswith("gpu-tests")):  # steps first, then their tests
        if log.name.startswith("gpu-tests"):
            # the device scripts name a step's GPU tests after it (gpu-tests-STEP.txt before STEP.txt): they go
            # where the step's log went; tests of no step (or of a step that named no run) go to every run
            named = filed.get(log.name[len("gpu-tests-"):], set()) or set(names)
        else:
            text = log.read_text(errors="replace")
            named = {Path(m).name for m in RUN_LINE.findall(text)} & set(names)
            if not named:  # a step cut before its summary: the run ids its progress lines and SIGTERM message name
                named = {name for name in names if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
            filed[log.name] = named
        for name in sorted(named):
            plan["logs"].setdefault(name, []).append(str(log))
        if not named:
            plan.setdefault("unfiled", []).append(str(log))  # names no run (e.g. a step that never started one)
    for name in names:
        plan["logs"].setdefault(name, [])
        plan["logs"][name] += [str(c) for c in consoles if str(c) not in plan["logs"][name]]
    if dry_run:
        return plan
    for run in runs:
        target = results / run.name
        if target.exists():
            done = subprocess.run([sys.executable, "-m", "attnbench.cli", "merge", str(target), str(run)],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"attnbench merge {target} {run} failed:\n{done.stdout}{done.stderr}")
        else:
            shutil.copytree(run, target)
        logs = target / "device-logs" / tag
        logs.mkdir(parents=True, exist_ok=True)
        for log in plan["logs"][run.name]:
            dest = logs / Path(log).name
            if dest.exists() and dest.read_bytes() != Path(log).read_bytes():
                dest = logs / f"{Path(log).parent.name}-{Path(log).name}"
            shutil.copy2(log, dest)
        plan["runs"][run.name]["after"] = dict(_statuses(target))
        if report:
            subprocess.run([sys.executable, "-m", "attnbench.cli", "report", str(target)], capture_output=True,
                           text=True, cwd=ROOT, check=False)
            (target / "report.html").unlink(missing_ok=True)
    cache = copy / "triton-autotune.tgz"
    if refresh_cache and cache.is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "refresh_autotune_cache.sh"), str(copy)], cwd=ROOT,
                       check=False)
    return plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files_at", type=Path)
    parser.add_argument("--tag", required=True, help="the session's log folder name, e.g. s15")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    scratch = args.scratch or Path("/tmp") / f"ingest-{args.files_at.name}-{int(time.time())}"
    plan = ingest(args.files_at, args.tag, args.results, scratch, report=not args.no_report, dry_run=args.dry_run)
    for name, info in plan["runs"].items():
        print(f"{name}: {info['action']} ({info['from']}); rows before {info['before'] or '-'}"
              + (f", after {info['after']}" if "after" in info else ""))
        for log in plan["logs"].get(name, []):
            print(f"  log {Path(log).name} -> {name}/device-logs/{args.tag}/")
    for name in plan.get("unchanged", []):
        print(f"{name}: unchanged (the call returned the committed rows): left alone")
    for log in plan.get("unfiled", []):
        print(f"not filed (names no run of this call; file it by hand if it matters): {log}")
    print(f"scratch copy: {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
