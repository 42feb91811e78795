"""`attnbench runs`: the run folders under a results directory with date, device and cases by status."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from attnbench.record.rundir import RunDirError, is_run_dir, load_run, parse_args
from attnbench.record.schema import STATUSES


def run_summaries(results_dir: Path) -> list[dict]:
    """One dict per run folder, newest first: run, date (env started_at, else the folder's modification time,
    marked "(mtime)"), device, rows, a count per status, and ``problem`` when the folder cannot be read."""
    summaries = []
    for folder in sorted(p for p in results_dir.iterdir() if is_run_dir(p)):
        entry = {"run": folder.name, "date": "", "device": "", "rows": 0, **{s: 0 for s in STATUSES}, "problem": ""}
        try:
            run = load_run(folder)
        except RunDirError as exc:
            entry["problem"] = str(exc)
            entry["date"] = _mtime(folder)
            summaries.append(entry)
            continue
        counts = run.rows["status"].value_counts()
        entry.update(date=str(run.env.get("started_at") or _mtime(folder)), device=run.device, rows=len(run.rows),
                     **{s: int(counts.get(s, 0)) for s in STATUSES})
        entry["problem"] = "; ".join(run.warnings)
        summaries.append(entry)
    return sorted(summaries, key=lambda e: e["date"].replace(" (mtime)", ""), reverse=True)


def _mtime(folder: Path) -> str:
    stamp = datetime.fromtimestamp(folder.stat().st_mtime, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ") + " (mtime)"


def format_table(summaries: list[dict]) -> str:
    """Aligned text table; status columns appear only when some run has such cases."""
    statuses = [s for s in STATUSES if any(e[s] for e in summaries)]
    header = ["run", "date", "device", "rows", *statuses, "note"]
    lines = [[e["run"], e["date"], e["device"], str(e["rows"]), *[str(e[s]) for s in statuses], e["problem"]]
             for e in summaries]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnbench runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="folder of run folders")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    if not args.results_dir.is_dir():
        print(f"attnbench runs: error: --results-dir {args.results_dir}: no such folder", file=sys.stderr)
        return 2
    summaries = run_summaries(args.results_dir)
    if not summaries:
        print(f"no runs in {args.results_dir}")
        return 0
    print(format_table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
