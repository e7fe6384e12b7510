"""Ray's worker set-up hook, in a module of its own: Ray runs it in every worker process it starts (Ray Train's
helper actors included), so it must import nothing heavy. Importing the launcher here instead (torch,
DeepSpeed, the config) cost about 3 s of CPU in each of some ten processes per run."""

from __future__ import annotations

import os


def pin_ray_address() -> None:
    """Name this cluster in RAY_ADDRESS inside every worker. Ray Train's clean-up actor looks its cluster up by
    address; with several local Ray instances on one machine (two runs side by side) it otherwise fails with
    "Found multiple active Ray instances" and prints a traceback."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
