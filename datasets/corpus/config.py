"""Settings of the corpus generator; ``--set key=value`` overrides any field (tuples comma-separated)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from polyfid._util import split_list


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """What to sample and how to run. The levels and their subsets are in ``levels.LEVELS``."""

    seed: int = 20261128
    """Base seed; molecule i's sampler RNG is ``default_rng([seed, i, kind])``."""
    md_temperatures: tuple[float, ...] = (300.0, 600.0, 1000.0)
    """GFN2-xTB Langevin MD temperatures (K), one trajectory each."""
    md_frames: int = 110
    """Frames kept per MD trajectory."""
    md_stride: int = 10
    """MD steps between kept frames."""
    md_equil: int = 100
    """Equilibration steps discarded at the start of each trajectory."""
    timestep_fs: float = 0.5
    """MD timestep (fs)."""
    friction_per_fs: float = 0.01
    """Langevin friction (1/fs)."""
    nm_frames: int = 90
    """Normal-mode displacement frames per molecule."""
    nm_temperatures: tuple[float, float] = (300.0, 1000.0)
    """Range of the temperature drawn for each normal-mode frame (K)."""
    rattle_frames: int = 30
    """Strongly rattled frames per molecule (Gaussian noise with sigma 0.08-0.2 A)."""
    compress_frames: int = 30
    """Compressed frames per molecule (whole molecule scaled 0.78-0.95, or one bond 0.72-0.9)."""
    target_md_frames: tuple[int, ...] = (70, 70, 60)
    """S3 target: MD frames per temperature of ``md_temperatures`` (200 in all)."""
    scan_bond: tuple[float, float, int] = (0.80, 1.60, 17)
    """S3 target phenol O-H bond scan: start, stop (A), points."""
    scan_torsion: tuple[float, float, int] = (0.0, 345.0, 24)
    """S3 target amide C-N-C(ar)-C(ar) torsion scan: start, stop (degrees), points."""
    molecules: tuple[str, ...] = ()
    """Names of the molecules to run (empty: the whole list)."""
    levels: tuple[str, ...] = ()
    """Names of the levels to label (empty: all of ``LEVELS``)."""
    target: bool = True
    """Sample and label the S3 target."""
    label_all: bool = False
    """Every level labels every structure with energy and forces (tests and small runs)."""
    num_cpus: int = 2
    """CPUs of the local Ray instance (ignored with --address)."""
    inflight_per_cpu: int = 2
    """Ray tasks kept in flight per cluster CPU."""
    nice: int = 0
    """CPU niceness of the sampling and labelling tasks (19: other work on the machine keeps priority)."""
    flush_s: float = 10.0
    """Write the label segments at least this often (seconds); every DFT result is written at once."""
    export: bool = True
    """Write the extxyz files and PROVENANCE.md at the end of the run."""
    call_log: str = ""
    """If set, each label/sample computation appends one line 'kind name key' to this file (tests)."""
    kill_after_tasks: int = 0
    """If > 0, SIGKILL the driver after this many finished tasks (tests of resume)."""

    def override(self, sets: Sequence[str]) -> "CorpusConfig":
        """A copy with ``key=value`` overrides; an unknown key is named with the allowed ones."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for item in sets:
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"bad --set {item!r}: key must be one of {sorted(fields)}")
            changes[key] = _parse(getattr(self, key), value)
        return dataclasses.replace(self, **changes)


def _parse(default: Any, value: str) -> Any:
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        items = split_list(value)
        if not default:
            return tuple(items)
        return tuple(type(default[min(i, len(default) - 1)])(v) for i, v in enumerate(items))
    return type(default)(value)
