"""attnbench's runner: CLI, planning, workers, timing, correctness gate, store, reports."""
