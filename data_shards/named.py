"""Stores named portably: `corpus:<file>` wherever a store path is accepted, built on first use; and the
portable form of any store path, for what a package or a model card records.

A package never records an absolute path of the machine that made it (DESIGN.md). A store made from the
committed corpus files (`data_shards/corpus/make_stores.sh`) is recorded by its name, `corpus:gfn2_xtb_train`.
On any machine that name resolves to a store built once from the committed file into the user cache
(`$POLYFID_CACHE/stores/corpus/`, default `~/.cache/polyfid/...`), and rebuilt when the file is newer. Other
local stores are recorded relative to the working directory of the run (as the user typed them there) and are
looked up from the working directory on use; URLs are recorded as given.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polyfid.data_shards.store import Store

log = logging.getLogger("polyfid.named")

CORPUS = "corpus:"
BASE_DIR_ENV = "POLYFID_BASE_DIR"  # set in training workers: the driver's working directory (see portable_ref)


def cache_root() -> Path:
    """Where named stores are built: $POLYFID_CACHE, else $XDG_CACHE_HOME/polyfid, else ~/.cache/polyfid."""
    env = os.environ.get("POLYFID_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polyfid"


def is_named_store(ref: str | os.PathLike) -> bool:
    return os.fspath(ref).startswith(CORPUS)


def corpus_names() -> list[str]:
    """Every `corpus:` name the committed files provide."""
    from polyfid.data_shards.corpus.stores import FILES

    return sorted(CORPUS + p.name[: -len(".extxyz.gz")] for p in FILES.glob("*.extxyz.gz"))


def resolve_store(ref: str | os.PathLike) -> str:
    """The local path or URL of a store reference: a `corpus:` name is built into the cache when missing or
    older than its committed file; anything else is returned as given."""
    text = os.fspath(ref)
    if not is_named_store(text):
        return text
    from polyfid.data_shards.corpus.stores import FILES, SOURCE_MARK, corpus_file, make_store

    stem = text[len(CORPUS):]
    src = corpus_file(stem)
    if not src.is_file():
        raise FileNotFoundError(
            f"{text}: no committed corpus file {src.name} in {FILES}; known names: {', '.join(corpus_names())}")
    out = cache_root() / "stores" / "corpus"
    store = out / f"{stem}.zarr"
    done = store / "zarr.json"  # written last, with the manifest
    if done.exists() and done.stat().st_mtime >= src.stat().st_mtime:
        return str(store)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{stem}.lock", "w") as lock:  # one builder per store; the others wait, then reuse it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done.exists() and done.stat().st_mtime >= src.stat().st_mtime):
            log.warning("%s: building the store from %s into %s (once; later uses read it from there)",
                        text, src.name, store)
            (out / SOURCE_MARK).write_text(str(FILES))
            make_store(src, out)
    return str(store)


def open_store(ref: str | os.PathLike) -> "Store":
    """Store.open of a path, an fsspec URL or a `corpus:` name (built into the user cache on first use). Every
    command and the workers open the stores a user names through this."""
    from polyfid.data_shards.store import Store

    return Store.open(resolve_store(ref))


def corpus_name_of(path: str | os.PathLike) -> str | None:
    """`corpus:<stem>` when `path` is a store that make_stores built from a committed corpus file, else None."""
    from polyfid.data_shards.corpus.stores import SOURCE_MARK, corpus_file

    text = os.fspath(path)
    if "://" in text or is_named_store(text):
        return text if is_named_store(text) else None
    p = Path(text)
    if not p.name.endswith(".zarr") or not (p.parent / SOURCE_MARK).is_file():
        return None
    stem = p.name[: -len(".zarr")]
    return CORPUS + stem if corpus_file(stem).is_file() else None


def portable_ref(ref: str | os.PathLike | None, base: str | os.PathLike | None = None) -> str | None:
    """What a package records for a store or file: a `corpus:` name, a URL as given, else the path relative to
    `base` (default: the working directory of the run's driver, $POLYFID_BASE_DIR in its workers, else this
    process's): what the user typed there, resolved against the working directory on use. Never an absolute
    path."""
    if ref is None:
        return None
    text = os.fspath(ref)
    name = corpus_name_of(text)
    if name is not None:
        return name
    for scheme in ("sqlite:///", "file://"):  # a local file inside a URI: the file's portable form
        if text.startswith(scheme) and os.path.isabs(text[len(scheme):]):
            return scheme + portable_ref(text[len(scheme):], base)
    if "://" in text or ":/" in text or not os.path.isabs(text):  # URLs, runs:/ and models:/ URIs, relative paths
        return text
    return os.path.relpath(text, base or os.environ.get(BASE_DIR_ENV) or os.getcwd())
