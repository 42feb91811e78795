"""Stage 1, configuration: validate the sweep, expand the grid into cases, load plugins."""
