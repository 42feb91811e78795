"""Stage 2, execution: the runner (parent), one worker process per device, and the case runner."""
