"""The Triton interpreter's switch for the kernel test files: their kernel tests (``@interp``) run only with
TRITON_INTERPRET=1, i.e. in the one child pytest of tests/test_triton_interpreter.py, and skip in the parent run."""
from __future__ import annotations

import os

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the child pytest of tests/test_triton_interpreter.py")


def sweep_rows(cfg: dict):
    """The rows ``run_sweep(cfg)`` records, as a DataFrame, with the cases run by the case runner in this process:
    the same validation, plan (capability filter: its ``unsupported`` rows), worker options and ``CaseRunner``
    (gate included), without the worker process, which under the interpreter starts torch and Triton again
    (~3 s a test; the worker itself is tested by the sweep tests)."""
    import pandas as pd

    from attnbench.config.plan import build_plan
    from attnbench.config.schema import validate_config
    from attnbench.execute.case import CaseRunner
    from attnbench.execute.runner import worker_options
    from attnbench.record.rows import describe

    validate_config(cfg)
    plan = build_plan(cfg)
    runner = CaseRunner(plan.devices[0], worker_options(cfg))
    rows = [{**describe(case, cfg["run_id"]), "status": "unsupported", "reason": reason}
            for case, reason in plan.unsupported]
    rows += [runner.run(case, cfg["run_id"]) for case in plan.runnable]
    return pd.DataFrame(rows)
