"""The model package: a folder with `model.safetensors` and `polyfid.json`. Loading never unpickles."""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polyfid._version import __version__
from polyfid.data_shards.schema import Fidelity
from polyfid.models.config import ModelConfig
from polyfid.models.potential import Potential

FORMAT = "polyfid-package"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "polyfid.json"
REQUIRED_KEYS = ("format", "format_version", "config", "elements", "fidelities", "reference_energies")


# Named models (`pretrained:NAME`): shipped in models/pretrained/, and in the folders on POLYFID_MODELS.
PREFIX = "pretrained:"
SHIPPED = pathlib.Path(__file__).resolve().parent / "pretrained"
ENV = "POLYFID_MODELS"


class UnknownModel(FileNotFoundError):
    """`pretrained:NAME` names no model on the search path."""


def search_path() -> list[pathlib.Path]:
    """The folders searched for named models, first match wins: POLYFID_MODELS's folders, then the shipped ones."""
    extra = [pathlib.Path(p).expanduser() for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
    return extra + [SHIPPED]


def package_metadata(model: Potential, lineage: dict | None = None, extra: dict | None = None) -> dict[str, Any]:
    """The contents of polyfid.json for `model`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "polyfid_version": __version__,
        "config": model.config.to_dict(),
        "elements": list(model.elements),
        "fidelities": [f.to_dict() for f in model.fidelities],
        "reference_energies": {
            name: {str(z): e for z, e in refs.items()} for name, refs in model.reference_energy_dict().items()
        },
        "head_scale_shift": model.scale_shift_dict(),  # also in the weights; here for people to read
        "lineage": dict(lineage or {}),
        "extra": dict(extra or {}),
    }


def save_package(
    path: str | os.PathLike, model: Potential, lineage: dict | None = None, extra: dict | None = None
) -> pathlib.Path:
    """Write `model` as a package folder at `path`, atomically; an existing package there is replaced."""
    path = pathlib.Path(path)
    if path.exists() and not _is_replaceable(path):
        raise FileExistsError(f"{path} exists and is not a polyfid package; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = package_metadata(model, lineage, extra)
    text = json.dumps(meta, indent=2, sort_keys=False)  # fails here, before anything is written, if not JSON-able
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / METADATA_FILE).write_text(text + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_replaceable(path: pathlib.Path) -> bool:
    """True for an existing package folder or an empty folder."""
    return path.is_dir() and ((path / METADATA_FILE).is_file() or not any(path.iterdir()))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check a package's polyfid.json (`path` may be `pretrained:NAME`)."""
    path = resolve_name(path)
    file = pathlib.Path(path) / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a polyfid package")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{file} lacks the key(s) {missing}")
    if meta["format"] != FORMAT:
        raise ValueError(f"{file}: format is {meta['format']!r}, expected {FORMAT!r}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {meta['format_version']!r} is newer than this polyfid reads ({FORMAT_VERSION})"
        )
    return meta


def load_package(path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
    """Load a package folder, or `pretrained:NAME`, into a Potential (its parsed JSON at `.package_metadata`);
    other files are ignored."""
    path = pathlib.Path(resolve_name(path))
    meta = read_metadata(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found: the package has no weights")
    tensors = load_file(str(weights_file), device="cpu")  # safetensors: raw buffers, no pickle
    file = path / METADATA_FILE
    try:
        config = ModelConfig.from_dict(meta["config"])
        fidelities = [Fidelity.from_dict(f) for f in meta["fidelities"]]
        refs = {name: {int(z): float(e) for z, e in m.items()} for name, m in meta["reference_energies"].items()}
        model = Potential(config, meta["elements"], fidelities, refs)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{file} does not describe a valid model: {err}") from err
    dtype = tensors.get("backbone.embed.weight", torch.empty(0)).dtype
    if dtype.is_floating_point:
        model.to(dtype)
    for key, value in model.state_dict().items():  # packages written before heads had a scale and a shift
        if key in ("head_scale", "head_shift"):
            tensors.setdefault(key, value)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_file} does not match the architecture in {file}: {err}") from err
    model.to(device)
    model.eval()
    model.package_metadata = meta
    return model


def named_folders() -> dict[str, pathlib.Path]:
    """name -> package folder over the search path, first match wins."""
    found: dict[str, pathlib.Path] = {}
    for root in search_path():
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if (folder / METADATA_FILE).is_file():
                    found.setdefault(folder.name, folder)
    return found


def is_named(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def resolve_name(source: str | os.PathLike) -> str | os.PathLike:
    """The package folder of `pretrained:NAME` (see models/pretrained.py); any other value is returned unchanged.

    An unknown name raises UnknownModel listing the names there are (and the closest one)."""
    if not is_named(source):
        return source
    name = str(source)[len(PREFIX):]
    folders = named_folders()
    if name in folders:
        return str(folders[name])
    close = difflib.get_close_matches(name, list(folders), n=1)
    hint = f"; did you mean {PREFIX}{close[0]}?" if close else ""
    where = ", ".join(str(p) for p in search_path())
    raise UnknownModel(f"no model named {name!r} (looked in {where}); available: "
                       f"{', '.join(sorted(folders)) or 'none'}{hint}")
