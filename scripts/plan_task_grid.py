#!/usr/bin/env python3
"""Plan issue 11's task grid (``attnbench train suite=tasks_grid``) over device calls of <= 540 s; no GPU needed.

    python scripts/plan_task_grid.py                                   # the whole grid, 8 cases at once
    python scripts/plan_task_grid.py --parallel 1                      # one case at a time (serial)
    python scripts/plan_task_grid.py --done results/h200-task-grid     # the follow-up: what has no row yet
    python scripts/plan_task_grid.py --done results/h200-task-grid --retry timeout crashed

Writes results/task-grid-plan.md and results/task-grid-plan.json (``--out`` to change the stem), prints the
summary, and exits 1 if the coverage check finds a case in no call, in two, or a call over its budget.
``--max-calls K`` (default 6): if the grid needs more calls, the later seeds of the slowest methods go to
follow-up calls after the K main ones (in the same plan, never dropped). ``--parallel N`` (default 8): each slice runs ``attnbench train parallel=N``; a call holds budget x the
throughput factor for N of serial-estimated training (attnbench.execute.task_grid.Throughput, fitted on the
committed rows trained at concurrency > 1), and the plan records N for scripts/device_task_grid.sh.
``scripts/device_task_grid.sh CALL_INDEX`` runs one call of the json plan.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARALLEL = 8
DEFAULT_MAX_CALLS = 6


def _max_calls(text: str) -> int:
    """--max-calls: an integer >= 0 (0: no limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: no limit), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: no limit), got {text!r}")
    return value


def _parallel(text: str) -> int:
    """--parallel: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (cases at once), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (cases at once), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    from attnbench.execute import task_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="tasks_grid", help="conf/suite/<name>.yaml (default tasks_grid)")
    parser.add_argument("--run-id", default="h200-task-grid", help="the run folder every call writes")
    parser.add_argument("--budget-s", type=float, default=task_grid.BUDGET_S, help="estimated seconds per call")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="committed runs for the cost model")
    parser.add_argument("--done", type=Path, help="a run folder: drop the cases that already have rows there")
    parser.add_argument("--retry", nargs="*", default=[], help="statuses in --done to plan again (e.g. timeout)")
    parser.add_argument("--parallel", type=_parallel, default=DEFAULT_PARALLEL,
                        help=f"cases at once in each slice (attnbench train parallel=N; default {DEFAULT_PARALLEL})")
    parser.add_argument("--max-calls", type=_max_calls, default=DEFAULT_MAX_CALLS,
                        help="main calls at most (default 6, two device sessions; 0: no limit): past it, seeds 1.. of "
                             "the slowest methods go to follow-up calls, listed in the plan")
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
        throughput = task_grid.Throughput.from_results(args.results, cost)
        if args.done is not None:  # the run's own rows, where earlier calls wrote some: the factor measured there
            throughput = task_grid.Throughput.from_run(args.done, cost, cfg, throughput, args.target_device)
        plan = task_grid.make_plan(cfg, cost, args.budget_s, done, suite=args.suite, run_id=args.run_id,
                                   target_device=args.target_device, parallel=args.parallel,
                                   throughput=throughput, max_calls=args.max_calls or None)
        problems = task_grid.check_coverage(cfg, plan, done, args.target_device)
    except ConfigError as exc:
        print(f"plan_task_grid: {exc}", file=sys.stderr)
        return 2
    # what every slice passes besides its own tasks/methods/seeds (which the slices set) and the run folder
    sliced = ("tasks", "methods", "seeds", "run_id", "results_dir")
    plan["grid_overrides"] = list(args.overrides)
    plan["overrides"] = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in sliced]
    plan["done_from"] = str(args.done) if args.done is not None else None
    # the statuses planned again: scripts/device_task_grid.sh passes them as retry=[...] (else the run folder's
    # rows of those statuses count as done there and the slice re-runs nothing: the tenth session's call 0)
    plan["retry"] = list(args.retry)
    stray = len(done - {e["case_id"] for e in plan["cases"]})
    plan["stray_rows"] = (task_grid.stray_rows(args.done, {e["case_id"] for e in plan["cases"]})
                          if args.done is not None else [])
    if stray:
        print(f"note: {stray} row(s) of {args.done} match no case of this grid (other parameters or methods, or "
              "a method's default options now fitted: listed in the plan)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(task_grid.render_markdown(plan))
    args.out.with_suffix(".json").write_text(task_grid.to_json(plan))
    totals = plan["totals"]
    print(f"{totals['cases']} cases ({totals['done']} done): {totals['to_run']} to run, {totals['unsupported']} "
          f"planned unsupported; {totals['calls']} calls of <= {args.budget_s:.0f} s at parallel={args.parallel} "
          f"(throughput factor {plan['throughput']['factor']:.2f}), estimated {totals['est_s'] / 60:.1f} GPU minutes "
          f"({totals['serial_s'] / 60:.1f} minutes of serial training)")
    if totals["follow_up_calls"]:
        print(f"main run: {totals['main_calls']} calls, {totals['main_est_s'] / 60:.1f} minutes; follow-up: "
              f"{totals['follow_up_calls']} calls, {totals['follow_up_est_s'] / 60:.1f} minutes, "
              f"{totals['follow_up_cases']} cases (seeds after the first of the {len(plan['deferred_methods'])} "
              f"slowest methods)")
    for call in plan["calls"]:
        print(f"call {call['index']:3d} {call['est_s']:6.0f} s {'follow-up ' if call['follow_up'] else ''}" +
              " | ".join(" ".join(piece["overrides"]) for piece in call["slices"]))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    for problem in problems:
        print(f"COVERAGE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
