"""The training loop, one per worker: the Trainer and what it is built from (engine, checkpoint, guard, EMA,
energy refit, validation, stopping, telemetry, progress) and the package it writes at the end.
It asks a mode (distributed/modes) for its stream and its step; it never imports the driver.
"""
