"""Stage 5, reports: report.md/html (``document`` is the command; its docstring maps the modules), plots,
comparison of runs, the console summary."""
