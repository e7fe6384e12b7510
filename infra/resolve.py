"""Where runs and packages live: a `--model` or `finetune.source` value to a local package folder, and a
tracking URI made absolute."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from polyfid.models.package import METADATA_FILE
from polyfid.models.pretrained import is_named, resolve_name


def resolve_tracking_uri(uri: str, base: str | os.PathLike | None = None) -> str:
    """`sqlite:///rel.db` -> `sqlite:////abs/rel.db`; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(base or os.getcwd()) / uri[len(prefix):]).resolve())
    return uri


MLFLOW_SCHEMES = ("runs:/", "models:/")


def fetch_remote_package(url: str, dst: str | os.PathLike | None = None) -> Path:
    """Download a package folder from an fsspec URL (s3://bucket/runs/x/package; credentials from the standard
    environment) into `dst` (a new temporary folder when None); returns the local package folder."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{METADATA_FILE}"):
        raise FileNotFoundError(f"{url} is not a polyfid package (no {METADATA_FILE} in it)")
    local = Path(dst if dst is not None else tempfile.mkdtemp()) / root.rsplit("/", 1)[-1]
    for f in fs.find(root):
        target = local / f[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(target))
    return local


def resolve_package(uri_or_path: str, tracking_uri: str | None, dst: str | os.PathLike | None = None) -> str:
    """A local package folder for a package path, `pretrained:NAME`, `runs:/ID/package` or `models:/NAME/VERSION`.

    An MLflow URI is downloaded from `tracking_uri` (a relative `sqlite:///` is taken from the working folder)
    into `dst`, a new temporary folder when None, and the package folder inside it is returned. A local
    path is returned as given. Raises FileNotFoundError naming the folder when it holds no polyfid.json,
    and ValueError for an MLflow URI without a tracking URI.
    """
    path = str(uri_or_path)
    if is_named(path):
        return str(resolve_name(path))
    if path.startswith(MLFLOW_SCHEMES):
        if not tracking_uri:
            raise ValueError(f"{path} is an MLflow URI, but no tracking URI was given to fetch it from")
        from polyfid.infra.tracking import download_package

        dst = dst if dst is not None else tempfile.mkdtemp()
        return str(download_package(path, resolve_tracking_uri(tracking_uri), dst))
    if "://" in path and not path.startswith("file://"):  # object storage (s3://...): fetched like an MLflow URI
        return str(fetch_remote_package(path, dst))
    if not (Path(path) / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a polyfid package folder (no {METADATA_FILE} in it) "
                                f"nor a pretrained:NAME, runs:/ or models:/ URI")
    return path
