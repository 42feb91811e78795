"""Stage 3, measurement: timers, memory, telemetry, the correctness gate, calibration, self-check."""
