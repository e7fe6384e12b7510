"""MLflow tracking from rank 0. A tracking outage warns and training goes on; it never crashes a run."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# MLflow's HTTP client retries with exponential backoff by default, which can stall training for minutes
# while a server is down. Fail fast instead; Tracker then skips calls for RETRY_AFTER_S and tries again.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
RETRY_AFTER_S = 60.0

log = logging.getLogger("polyfid.tracking")


@contextlib.contextmanager
def sqlite_lock(uri: str):
    """Hold `<database>.lock` while an MLflow sqlite database may be created: two jobs started at once on a
    new database would otherwise both run MLflow's schema migrations and one would fail half-way."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    path = Path(uri[len(prefix):])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Tracker:
    """A thin, failure-tolerant wrapper over MlflowClient for one run."""

    def __init__(self, uri: str, run_id: str | None = None, enabled: bool = True, strict: bool = False) -> None:
        self.uri = uri
        self.run_id = run_id
        self.enabled = enabled
        self.strict = strict  # raise tracking failures (for commands whose only job is tracking)
        self._client = None
        self._warned = False
        self._down_until = 0.0
        self.failures = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            with sqlite_lock(self.uri):  # a new database is migrated by the first client; one at a time
                client = MlflowClient(tracking_uri=self.uri)
                if self.uri.startswith("sqlite:"):
                    client.search_experiments(max_results=1)  # creates and migrates the database now
            self._client = client
        return self._client

    def start(self, experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """Create the experiment if needed and open a run; returns its id (None when tracking is off)."""
        if not self.enabled:
            return None

        def _start():
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location(self.uri))
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            return run.info.run_id

        self.run_id = self._guard("start a run", _start)
        return self.run_id

    def run_exists(self, run_id: str) -> bool:
        """Whether this tracking store holds `run_id` (False when tracking is off or unreachable)."""
        if not self.enabled:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - a missing run or an unreachable server both mean "no link"
            return False

    def resume(self) -> None:
        """Mark a run that is being resumed (after a preemption or a crash) as running again."""
        self._call("resume the run", lambda: self.client.update_run(self.run_id, status="RUNNING"))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._guard("end the run", lambda: self.client.set_terminated(self.run_id, status=status))

    # -- logging -----------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log params", lambda: self.client.log_batch(self.run_id, params=items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), now, int(step)) for k, v in metrics.items() if v == v]
        self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (e.g. stop_reason), each on its own call."""
        for k, v in tags.items():
            self._call(f"set tag {k}", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)[:5000]))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._call(f"upload {p.name}", lambda: fn(self.run_id, str(p), artifact_path))

    def register(self, name: str, artifact_path: str = "package", description: str | None = None) -> str | None:
        """Register the run's package artifact as a new version of model `name`; returns the version. The
        `description` (the model card) goes on the version and on the registered model, where the registry shows it."""

        def _reg():
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name, description=description)
            except MlflowException:  # exists already: the newest version's card describes it
                if description:
                    self.client.update_registered_model(name, description=description)
            source = f"runs:/{self.run_id}/{artifact_path}"
            mv = self.client.create_model_version(name, source=source, run_id=self.run_id, description=description)
            return mv.version

        return self._call(f"register model {name}", _reg)

    # -- failure tolerance -------------------------------------------------------------------------
    def _call(self, what: str, fn):
        if not self.enabled or not self.run_id:
            return None
        return self._guard(what, fn)

    def _guard(self, what: str, fn):
        if self.strict:
            return fn()
        if time.monotonic() < self._down_until:
            return None  # recently unreachable: skip, so that training does not wait on timeouts
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            self.failures += 1
            self._down_until = time.monotonic() + RETRY_AFTER_S
            if not self._warned:
                msg = (f"MLflow tracking at {self.uri} failed to {what} ({type(e).__name__}: {str(e)[:200]}); "
                       f"training goes on, and tracking is retried every {RETRY_AFTER_S:.0f} s")
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                log.warning(msg)
                self._warned = True
            return None
        if self._warned:
            log.warning("MLflow tracking at %s works again", self.uri)
            self._warned = False
        return out


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, keep artifacts in `mlartifacts/` beside the database, not in the working dir."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _key(k: str) -> str:
    """MLflow metric names allow [A-Za-z0-9_./- ]; replace anything else."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def download_package(uri: str, tracking_uri: str, dst: str | os.PathLike) -> Path:
    """Fetch a package from `runs:/ID/package` or `models:/NAME/VERSION` (or `models:/NAME/latest`,
    `models:/NAME@ALIAS`) into dst; returns its folder.

    One MlflowClient bound to `tracking_uri` does it all: mlflow's global download helpers cache the registry
    of the first URI a process used, so a second tracking store in the same process was not found.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id, path = _run_artifact(client, uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run_id, path, str(dst)))
    if not (local / "polyfid.json").exists() and (local / "package" / "polyfid.json").exists():
        local = local / "package"
    if not (local / "polyfid.json").exists():
        raise FileNotFoundError(f"{uri} does not hold a polyfid package (no polyfid.json in {local})")
    return local


def _run_artifact(client, uri: str) -> tuple[str, str]:
    """(run id, artifact path) of a `runs:/` or `models:/` URI, the latter looked up in the client's registry."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        return run_id, path
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri} is not an MLflow runs:/ or models:/ URI")
    ref = uri[len("models:/"):].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = ref.rpartition("/")
        if not name:
            raise ValueError(f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
        if version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise FileNotFoundError(f"{uri}: model {name!r} has no versions in the registry")
            version = str(max(int(v.version) for v in versions))
        mv = client.get_model_version(name, version)
    if mv.source.startswith("runs:/"):
        return _run_artifact(client, mv.source)
    if mv.run_id:  # a source given as the artifact location itself: the package is the run's `package` folder
        return mv.run_id, "package"
    raise FileNotFoundError(f"{uri}: version {mv.version} of {mv.name!r} is not linked to a run ({mv.source})")


def register_package(source: str, name: str, tracking_uri: str, experiment: str = "polyfid-pretrained",
                     tags: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Put an existing package (a folder or `pretrained:NAME`) into the MLflow model registry as model `name`.

    Opens a run in `experiment` that holds the package (and its model card, if any) as the artifact `package`,
    with the package's architecture, levels and elements as parameters; registers it as a new version.
    Returns (run id, version). Unlike a training run, a registration failure raises: it is all this does.
    """
    from polyfid.models.package import read_metadata, resolve_name

    folder = Path(resolve_name(source))
    meta = read_metadata(folder)
    tracker = Tracker(tracking_uri, strict=True)
    tracker.start(experiment, f"register {source}",
                  {"polyfid.source": str(source), "polyfid.kind": "registered package", **dict(tags or {})})
    params = {f"model.{k}": v for k, v in meta.get("config", {}).items() if not isinstance(v, (list, dict))}
    params["fidelities"] = ",".join(f["name"] for f in sorted(meta.get("fidelities", []), key=lambda f: f["rank"]))
    params["elements"] = ",".join(str(z) for z in meta.get("elements", []))
    params["source"] = str(source)
    tracker.log_params(params)
    tracker.log_artifact(folder, "package")
    version = tracker.register(name, description=registry_description(folder))
    tracker.end()
    return tracker.run_id, str(version)


DESCRIPTION_MAX = 5000  # MLflow's registry keeps descriptions in a VARCHAR(5000)


def registry_description(package: str | os.PathLike) -> str:
    """What the model registry shows for a package: its MODEL_CARD.md, else a few lines from its metadata (kind,
    levels, elements, cutoff, lineage); cut to the registry's 5,000 characters with a pointer to the full card."""
    from polyfid.models.package import read_metadata

    folder = Path(package)
    card = folder / "MODEL_CARD.md"
    if card.is_file():
        text = card.read_text()
    else:
        meta = read_metadata(folder)
        cfg, lineage = meta.get("config", {}), meta.get("lineage", {})
        levels = ", ".join(f"{f['name']} (rank {f['rank']})" for f in sorted(meta.get("fidelities", []),
                                                                                key=lambda f: f["rank"]))
        text = "\n".join([
            f"polyfid {cfg.get('kind', 'model')} package (no model card).", "",
            f"- Levels (heads): {levels or 'none'}",
            f"- Elements: {', '.join(str(z) for z in meta.get('elements', []))}",
            f"- Cutoff: {cfg.get('cutoff', '?')} Å; width {cfg.get('width', '?')}",
            f"- Trained by MLflow run {lineage.get('mlflow_run_id', '?')}"
            + (f", fine-tuned from {lineage['parent']}" if lineage.get("parent") else ""),
        ])
    if len(text) > DESCRIPTION_MAX:
        tail = "\n\n[cut here: the whole card is the MODEL_CARD.md artifact of this version's package]"
        text = text[: DESCRIPTION_MAX - len(tail)] + tail
    return text
