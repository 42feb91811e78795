"""Stage 5, reports: report.md/html, plots, comparison of runs, the console summary."""
