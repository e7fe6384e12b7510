"""The `polyfid` command: ingest, pretrain, finetune, evaluate, export, ui, demo."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from polyfid.launch import evaluate_cmd, finetune_cmd
from polyfid.launch.summary import print_summary
from polyfid.data_shards.named import open_store

RECIPES = Path(__file__).parent / "recipes"


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"polyfid: {what} expects FIDELITY=KEY, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_ingest(a: argparse.Namespace) -> int:
    from polyfid.data_shards.ingest import ingest
    from polyfid.data_shards.outliers import OutlierCheck

    ranks = {k: int(v) for k, v in _pairs(a.rank, "--rank").items()}
    store = ingest(
        a.inputs,
        a.out,
        dataset=a.dataset,
        energy=_pairs(a.energy, "--energy"),
        forces=_pairs(a.forces, "--forces"),
        ranks=ranks,
        energy_unit=a.energy_unit,
        length_unit=a.length_unit,
        append=a.append,
        shard_size=a.shard_size,
        min_distance=a.min_distance,
        merge_on=a.merge_on,
        workers=a.workers,
        progress=not a.quiet,
        outliers=OutlierCheck(a.outliers, k_mad=a.outlier_mad, force_cap=a.outlier_force_cap),
    )
    fids = ", ".join(f"{f.name} (rank {f.rank})" for f in store.fidelities)
    print(f"{a.out}: {store.n_structures} structures, {store.n_atoms} atoms, {len(store.shards)} shards; fidelities {fids}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from polyfid.data_shards.inspect import format_summary, summarize

    try:
        summary = summarize(open_store(a.store))
    except ValueError as e:
        print(f"polyfid inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str) if a.json else format_summary(summary))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from polyfid.data_shards.inspect import verify_store

    try:
        store, bad = verify_store(a.store)
    except ValueError as e:
        print(f"polyfid verify: error: {e}", file=sys.stderr)
        return 2
    if bad:
        print(f"polyfid verify: {a.store}: {len(bad)} of {len(store.shards)} shards are corrupt: "
              f"{', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"{a.store}: all {len(store.shards)} shards match their checksums ({store.n_structures} structures)")
    return 0


def _run_config(a: argparse.Namespace, extra: list[str]):
    from polyfid.distributed.config import load_config

    return load_config(a.config, extra + (a.set or []))


def cmd_pretrain(a: argparse.Namespace) -> int:
    from polyfid.distributed.driver.launcher import run_training

    extra = [f"cluster.address={a.address}"] if a.address else []
    summary = run_training(_run_config(a, extra))
    print_summary(summary)
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from polyfid.distributed.config import load_config

    return finetune_cmd.run(a, load_config)


def cmd_evaluate(a: argparse.Namespace) -> int:
    return evaluate_cmd.run(a)


def cmd_export(a: argparse.Namespace) -> int:
    from polyfid.data_shards.schema import highest_rank
    from polyfid.models.package import load_package

    try:
        from polyfid.models.metatomic import export_metatomic
    except ImportError as e:
        print(f"polyfid export: error: {e}; install the exporters with: pip install 'polyfid[export]'", file=sys.stderr)
        return 2
    try:
        model = load_package(a.package)
        out = export_metatomic(model, a.out, fidelity=a.fidelity, dtype=a.dtype)
    except (ValueError, KeyError) as e:
        print(f"polyfid export: error: {e}", file=sys.stderr)
        return 2
    default = a.fidelity or highest_rank(model.fidelities).name
    variants = ", ".join(f"energy/{name}" for name in model.fidelity_names)
    print(f"{out}: metatomic model ({a.dtype}), outputs energy ({default}) and {variants}. "
          "Load it with metatomic-ase, LAMMPS (pair_style metatomic), i-PI or TorchSim.")
    return 0


def cmd_ui(a: argparse.Namespace) -> int:
    from polyfid.infra.resolve import resolve_tracking_uri

    uri = resolve_tracking_uri(a.tracking_uri)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    host = a.host or ("0.0.0.0" if a.serve else "127.0.0.1")
    cmd = [mlflow, "server", "--backend-store-uri", uri, "--host", host, "--port", str(a.port), "--workers", "1"]
    if a.serve:  # a tracking server for a cluster: runs and their artifacts go through it over HTTP
        artifacts = a.artifacts if a.artifacts and "://" in a.artifacts else Path(a.artifacts or "mlartifacts").resolve()
        cmd += ["--serve-artifacts", "--artifacts-destination", str(artifacts)]
        if host not in ("127.0.0.1", "localhost"):
            cmd += ["--allowed-hosts", "*"]  # other nodes reach it by this node's name or address
        name = socket.gethostname() if host == "0.0.0.0" else host
        print(f"MLflow tracking server for {uri}, artifacts in {artifacts}: run every job with\n"
              f"  --set tracking.uri=http://{name}:{a.port}\n(Ctrl-C stops it)", flush=True)
    else:
        print(f"MLflow dashboard for {uri} at http://{host}:{a.port} (Ctrl-C stops it)", flush=True)
    # On Ctrl-C or SIGTERM the server and its workers end with this command: `mlflow server` would otherwise
    # outlive it and keep the port. (They stay in its process group, so a SIGKILL of the group ends them too.)
    server = subprocess.Popen(cmd, env=env)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_group(server)


def _end_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM a child and all its descendants, and SIGKILL what is left after `grace_s`."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def cmd_demo(a: argparse.Namespace) -> int:
    from polyfid.launch.demo import run_demo

    shipped = None if a.shipped.lower() == "none" else a.shipped
    run_demo(Path(a.workdir), steps=a.steps, workers=a.workers, overrides=a.set or [], s1=a.s1, shipped=shipped)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from polyfid.models.pretrained import available, finetune_summary, search_path

    models = available()
    if a.json:
        print(json.dumps({n: {**dataclasses.asdict(m), "path": str(m.path), "card": m.card and str(m.card)}
                          for n, m in models.items()}, indent=2))
        return 0
    if not models:
        print(f"no named models in {', '.join(str(p) for p in search_path())}")
        return 0
    rows = [("name", "levels (low to high)", "elements", "cutoff", "size", "model card")]
    for m in models.values():
        rows.append((f"pretrained:{m.name}", ",".join(m.fidelities), ",".join(map(str, m.elements)),
                     f"{m.cutoff:g} Å", f"{m.size_bytes / 1e6:.1f} MB", str(m.card or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for m in models.values():
        line = finetune_summary(m.finetune)
        if line:
            print(f"pretrained:{m.name}: {line} (its model card has the table and the command)")
    return 0


def cmd_register(a: argparse.Namespace) -> int:
    from polyfid.infra.resolve import resolve_tracking_uri
    from polyfid.infra.tracking import register_package
    from polyfid.models.package import PREFIX, is_named

    name = a.name or ("polyfid-" + (a.source[len(PREFIX):] if is_named(a.source) else Path(a.source).resolve().name))
    uri = resolve_tracking_uri(a.tracking_uri)
    run_id, version = register_package(a.source, name, uri, a.experiment)
    print(f"registered {a.source} as models:/{name}/{version} (MLflow run {run_id} in {uri}); fine-tune it with\n"
          f"  polyfid finetune --from models:/{name}/{version} --data TARGET.zarr --out runs/ft "
          f"--set tracking.uri={a.tracking_uri}")
    return 0


def _add_export_parser(sub) -> None:
    """The `export` subcommand: `polyfid export --to metatomic PACKAGE OUT.pt`."""
    s = sub.add_parser("export", help="write a package as a model for other engines (metatomic: LAMMPS, i-PI, ASE, TorchSim)")
    s.add_argument("--to", required=True, choices=["metatomic"], help="the target format")
    s.add_argument("package", help="the model package folder, or pretrained:NAME")
    s.add_argument("out", help="the file to write, e.g. model.pt")
    s.add_argument("--fidelity", help="the head of the default `energy` output (default: highest rank); "
                   "every head is also exported as the variant energy/<fidelity>")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype of the model (default float32)")
    s.set_defaults(fn=cmd_export)


def _add_tool_parsers(sub) -> None:
    """register, ui and demo."""
    s = sub.add_parser("register", help="put a package or pretrained:NAME into the MLflow model registry")
    s.add_argument("source", help="a package folder or pretrained:NAME")
    s.add_argument("--name", help="registered model name (default: polyfid-NAME, or polyfid-<folder>)")
    s.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    s.add_argument("--experiment", default="polyfid-pretrained", help="the experiment of the registering run")
    s.set_defaults(fn=cmd_register)

    s = sub.add_parser("ui", help="serve the MLflow dashboard on 127.0.0.1, or (--serve) a tracking server for a cluster")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the backend store (sqlite or a database URL)")
    s.add_argument("--serve", action="store_true", help="a tracking server for runs on other nodes: listens on "
                   "every interface and proxies artifacts (--set tracking.uri=http://HEAD:PORT in each run)")
    s.add_argument("--host", help="the interface to listen on (default 127.0.0.1; with --serve 0.0.0.0)")
    s.add_argument("--artifacts", help="with --serve: where the server keeps artifacts (default ./mlartifacts; "
                   "an s3:// URI works too)")
    s.set_defaults(fn=cmd_ui)

    s = sub.add_parser("demo", help="the whole path on the embedded QM data")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--steps", type=int, default=None, help="pretraining steps (default from the recipe)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--s1", action="store_true", help="also train S1's baselines (a) and (b) and print the S1 table "
                   "(two more trainings; benchmarks/bench_s1.py runs them over seeds)")
    s.add_argument("--no-s1", dest="s1", action="store_false", help=argparse.SUPPRESS)  # kept for old scripts: no S1 is the default
    s.add_argument("--shipped", default="organic-mini", metavar="NAME",
                   help="the shipped checkpoint (pretrained:NAME) to register and fine-tune beside the demo's own; "
                   "none: skip it")
    s.set_defaults(fn=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polyfid", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="read extxyz / ASE db / ANI HDF5 / MD17 npz files into a zarr store")
    s.add_argument("inputs", nargs="+",
                   help="extxyz(.gz), .db, ANI .h5 or MD17 .npz files; PATH@START:STOP takes a slice")
    s.add_argument("--out", required=True, help="the store to create (or extend with --append)")
    s.add_argument("--dataset", required=True, help="dataset name recorded for these structures")
    s.add_argument("--energy", action="append", metavar="FIDELITY=KEY", help="energy label (repeatable)")
    s.add_argument("--forces", action="append", metavar="FIDELITY=KEY", help="forces label (repeatable)")
    s.add_argument("--rank", action="append", metavar="FIDELITY=N", help="fidelity rank; higher = more accurate")
    s.add_argument("--energy-unit", default=None,
                   help="eV | hartree | kcal/mol | kJ/mol (default: the format's own: eV, ANI h5 hartree, "
                   "MD17 kcal/mol, SPICE hartree)")
    s.add_argument("--length-unit", default=None,
                   help="angstrom | bohr (default: the format's own: bohr for SPICE HDF5, else angstrom)")
    s.add_argument("--append", action="store_true", help="add to an existing store")
    s.add_argument("--merge-on", metavar="id:KEY|geometry",
                   help="one row per structure: merge frames (and, with --append, the store's structures) "
                   "with equal KEY or geometry")
    s.add_argument("--min-distance", type=float, default=0.1, help="refuse atoms closer than this (Å; default 0.1)")
    s.add_argument("--workers", type=int, default=1,
                   help="Ray tasks in flight, one per output shard (default 1: serial)")
    s.add_argument("--shard-size", type=int, default=50_000, help="structures per shard (default 50000)")
    s.add_argument("--outliers", choices=("warn", "drop", "error"), default="warn",
                   help="label outliers after the reference fit: name them (default), mask their labels, or refuse")
    s.add_argument("--outlier-mad", type=float, default=20.0,
                   help="energy outlier: per-atom residual beyond median ± this x MAD of its fidelity and dataset")
    s.add_argument("--outlier-force-cap", type=float, default=1000.0,
                   help="force outlier: any |F| above this (eV/Å; default 1000)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("inspect", help="fidelities, datasets, counts, label coverage, reference energies")
    s.add_argument("store", help="store path or fsspec URL")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("verify", help="check every shard's checksum; exit 1 naming corrupt shards")
    s.add_argument("store", help="store path or fsspec URL")
    s.set_defaults(fn=cmd_verify)

    for name, help_ in (("pretrain", "pretrain on Ray Train + DeepSpeed"), ("finetune", "fine-tune a package")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=name == "pretrain", help="YAML recipe (see launch/recipes/)")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        if name == "pretrain":
            s.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
            s.set_defaults(fn=cmd_pretrain)
        else:
            finetune_cmd.add_arguments(s)
            s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("evaluate", help="errors per fidelity, parity plots, PES scans, NVE drift; to MLflow")
    evaluate_cmd.add_arguments(s)
    s.set_defaults(fn=cmd_evaluate)

    _add_export_parser(sub)

    s = sub.add_parser("models", help="list the named models (pretrained:NAME) that ship with polyfid or are on "
                       "POLYFID_MODELS")
    s.add_argument("--json", action="store_true", help="print them as JSON")
    s.set_defaults(fn=cmd_models)

    _add_tool_parsers(sub)
    from polyfid.launch.baseline_cli import register as _reg_baseline; _reg_baseline(sub)  # noqa: E702
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from polyfid.data_shards.ingest import IngestError
    from polyfid.data_shards.store import CorruptShardError
    from polyfid.distributed.config import ConfigError
    from polyfid.distributed.driver.lock import FolderInUse

    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"polyfid: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ours, or a wrong endpoint, bucket or credentials: one line instead of a traceback
        from polyfid.infra.run_storage import storage_error

        why = storage_error(e)
        known = isinstance(e, (IngestError, CorruptShardError, FileNotFoundError, FolderInUse))
        if not (known or why) or os.environ.get("POLYFID_DEBUG"):
            raise
        print(f"polyfid {args.command}: error: {why or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
