"""The entry point of every training process: Ray Train workers, and plain torch.distributed processes in tests.

The run itself is the Trainer (trainer.py); this only turns the launcher's message into one.
"""

from __future__ import annotations

import os
from typing import Any

from polyfid.data_shards.named import BASE_DIR_ENV
from polyfid.distributed.config import RunConfig
from polyfid.distributed.finetune.plan import FinetunePlan
from polyfid.distributed.driver.lock import worker_hold
from polyfid.distributed.loop.trainer import Trainer
from polyfid.data_shards.named import open_store


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train as the launcher asked: {"run": RunConfig dict, "finetune_plan": FinetunePlan dict or None,
    "mlflow_run_id", "live_progress"}. Without a plan, a run with finetune.source makes its own."""
    if config.get("base_dir"):  # the driver's working directory: packages record store paths relative to it
        os.environ[BASE_DIR_ENV] = config["base_dir"]
    cfg = RunConfig.from_dict(config["run"])
    plan = config.get("finetune_plan")
    if plan is not None:
        plan = FinetunePlan.from_dict(plan)
    elif cfg.finetune.source:
        plan = FinetunePlan.build(cfg, [open_store(p) for p in cfg.data.train])
    with worker_hold(cfg.output):  # a new run on this folder waits for workers that outlive a killed driver
        Trainer(cfg, config.get("mlflow_run_id"), plan, config.get("live_progress")).build().train()
