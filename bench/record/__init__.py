"""Stage 4, records: the row schema, rows, the crash-safe store, run folders, provenance."""
