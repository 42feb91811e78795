#!/usr/bin/env python3
"""Plan issue 11's task grid (``attnbench train suite=tasks_grid``) over device calls of <= 540 s; no GPU needed.

    python scripts/plan_task_grid.py                                   # the whole grid
    python scripts/plan_task_grid.py --done results/h200-task-grid     # the follow-up: what has no row yet
    python scripts/plan_task_grid.py --done results/h200-task-grid --retry timeout crashed

Writes results/task-grid-plan.md and results/task-grid-plan.json (``--out`` to change the stem), prints the
summary, and exits 1 if the coverage check finds a case in no call, in two, or a call over its budget.
``scripts/device_task_grid.sh CALL_INDEX`` runs one call of the json plan.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from attnbench.execute import task_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="tasks_grid", help="conf/suite/<name>.yaml (default tasks_grid)")
    parser.add_argument("--run-id", default="h200-task-grid", help="the run folder every call writes")
    parser.add_argument("--budget-s", type=float, default=task_grid.BUDGET_S, help="estimated seconds per call")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="committed runs for the cost model")
    parser.add_argument("--done", type=Path, help="a run folder: drop the cases that already have rows there")
    parser.add_argument("--retry", nargs="*", default=[], help="statuses in --done to plan again (e.g. timeout)")
    parser.add_argument("--target-device", default="cuda", help="the device the calls run on (default cuda)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "task-grid-plan", help="output stem")
    parser.add_argument("overrides", nargs="*", help="extra `attnbench train` overrides of the suite")
    args = parser.parse_args(argv)

    from attnbench.config.plan import ConfigError

    done = set()
    if args.done is not None:
        if not (args.done / "quality.jsonl").is_file():
            parser.error(f"--done {args.done}: no quality.jsonl there")
        done = task_grid.done_case_ids(args.done, tuple(args.retry))
    try:
        cfg = task_grid.compose_suite(args.suite, tuple(args.overrides))
        cost = task_grid.CostModel.from_results(args.results)
        plan = task_grid.make_plan(cfg, cost, args.budget_s, done, suite=args.suite, run_id=args.run_id,
                                   target_device=args.target_device)
        problems = task_grid.check_coverage(cfg, plan, done, args.target_device)
    except ConfigError as exc:
        print(f"plan_task_grid: {exc}", file=sys.stderr)
        return 2
    # what every slice passes besides its own tasks/methods/seeds (which the slices set) and the run folder
    sliced = ("tasks", "methods", "seeds", "run_id", "results_dir")
    plan["grid_overrides"] = list(args.overrides)
    plan["overrides"] = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in sliced]
    plan["done_from"] = str(args.done) if args.done is not None else None
    stray = len(done - {e["case_id"] for e in plan["cases"]})
    if stray:
        print(f"note: {stray} row(s) of {args.done} match no case of this grid (other parameters or methods)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(task_grid.render_markdown(plan))
    args.out.with_suffix(".json").write_text(task_grid.to_json(plan))
    totals = plan["totals"]
    print(f"{totals['cases']} cases ({totals['done']} done): {totals['to_run']} to run, {totals['unsupported']} "
          f"planned unsupported; {totals['calls']} calls of <= {args.budget_s:.0f} s, estimated "
          f"{totals['est_s'] / 60:.1f} GPU minutes")
    for call in plan["calls"]:
        print(f"call {call['index']:3d} {call['est_s']:6.0f} s  " +
              " | ".join(" ".join(piece["overrides"]) for piece in call["slices"]))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    for problem in problems:
        print(f"COVERAGE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
