"""Training: the driver starts a run, the loop trains it, the modes say what one step does.

Rooms, top to bottom: driver/ (launch, the output-folder lock, the worker entry point), loop/ (Trainer,
checkpoints, the step guard, EMA, validation, stopping, telemetry, the DeepSpeed engine, the package),
modes/ (multi-fidelity steps and losses, Reptile, replay), finetune/ (the plan, forgetting, the scratch
comparison). config.py is the typed run configuration every room reads.
"""
