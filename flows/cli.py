"""The `dpoflow` command line. Every command takes `--workspace DIR`; listings take `--json`.

Stage areas add their own commands through the modules in PLUGINS (each has `register(sub)`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The temporary server migrates its SQLite database on first start: slow on small machines.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

PLUGINS = [
    "dpoflow.flows.cli_metrics",
    "dpoflow.flows.cli_feedback",
    "dpoflow.flows.cli_train",
    "dpoflow.flows.cli_deploy",
    "dpoflow.flows.cli_pipeline",
]


def _ws(args: argparse.Namespace, *, create: bool = False):
    """The command's workspace; only commands that write (import, run, ...) may create it."""
    from dpoflow.flows.workspace import Workspace

    return Workspace.open(args.workspace, getattr(args, "set", None) or None, create=create)


def _print(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=1, default=str, ensure_ascii=False))
    else:
        print("\n".join(lines))


# --- import --------------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    ws = _ws(args, create=True)
    if args.name == "annotations":  # several formats + aggregation into judgements
        from dpoflow.flows.importing import import_annotations

        result = import_annotations(ws, args.file, force=args.force)
        _print(args, result, [f"{k}: {v}" for k, v in result.items()])
        return 0
    from dpoflow.flows.importing import import_dataset

    run = import_dataset(ws, args.name, args.file, force=args.force, replace=args.replace)
    rep = run.report
    if run.skipped:
        lines = [f"unchanged since last import: {run.outputs.get(args.name)} (use --force to import again)"]
    else:
        target = run.outputs.get(args.name) or "no new version (no valid row)"
        lines = [f"imported {rep['rows_out']} of {rep['rows_in']} rows into {target}"]
        if rep.get("replaced"):
            lines.append(f"  replaced {rep['replaced']} (--replace: its rows are not in the new version)")
        elif rep.get("added_to"):
            lines.append(f"  added to the rows of {rep['added_to']}")
        for reason, n in (rep.get("quarantined") or {}).items():
            lines.append(f"  quarantined {n}: {reason}")
        for reason, n in (rep.get("dropped") or {}).items():  # events: repeats of an event id
            lines.append(f"  dropped {n}: {reason}")
        if "quarantine" in run.outputs:
            lines.append(f"  bad rows are in {run.outputs['quarantine']} (dpoflow datasets show quarantine)")
        for note in rep.get("notes") or []:
            lines.append(f"  note: {note}")
    _print(args, {"outputs": run.outputs, "skipped": run.skipped, "report": rep}, lines)
    return 0


# --- datasets ------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    store = _ws(args).store
    rows = []
    for name in store.list():
        if name.startswith("shard_") and not args.all:
            continue  # resumable work units of a stage, not user-facing data
        info = store.info(name)
        rows.append({"name": name, "latest": info.version, "rows": info.rows, "stage": info.stage,
                     "created": info.created, "tags": store.tags(name)})
    lines = [f"{'dataset':<18} {'latest':>6} {'rows':>10}  {'stage':<16} created" ]
    lines += [f"{r['name']:<18} {r['latest']:>6} {r['rows']:>10}  {str(r['stage']):<16} {r['created']}"
              + (f"  tags={r['tags']}" if r["tags"] else "") for r in rows]
    _print(args, rows, lines if rows else ["no datasets yet (dpoflow import NAME FILE, or dpoflow demo)"])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _ws(args).store
    info = store.info(args.ref)
    table = store.read(info.ref)
    head = store.head(info.ref, args.limit)  # safe for any stored value (e.g. a year -1 time)
    data = {**info.to_dict(), "schema": [f"{f.name}: {f.type}" for f in table.schema], "head": head}
    lines = [f"{info.ref}  rows={info.rows}  stage={info.stage}  created={info.created}",
             f"parents: {', '.join(info.parents) or '-'}", f"code: {info.code_version}", "columns:"]
    lines += [f"  {f.name}: {f.type}" for f in table.schema]
    lines.append(f"first {len(head)} rows:")
    lines += ["  " + json.dumps(r, default=str, ensure_ascii=False)[:300] for r in head]
    _print(args, data, lines)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    store = _ws(args).store
    infos = store.log(args.name)
    tags = store.tags(args.name)
    rows = [{**i.to_dict(), "tags": [t for t, v in tags.items() if v == i.version]} for i in infos]
    lines = [f"{r['ref']:<20} rows={r['rows']:<9} stage={r['stage'] or '-':<14} {r['created']}"
             + (f"  tags={r['tags']}" if r["tags"] else "") + (f"  <- {', '.join(r['parents'])}" if r["parents"] else "")
             for r in rows]
    _print(args, rows, lines)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    tree = _ws(args).store.lineage(args.ref)
    lines: list[str] = []

    def walk(node: dict, depth: int) -> None:
        lines.append("  " * depth + f"{node['ref']}  ({node['stage'] or 'imported'})" + (" ..." if node.get("seen") else ""))
        for p in node["parents"]:
            walk(p, depth + 1)

    walk(tree, 0)
    _print(args, tree, lines)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    ref = _ws(args).store.tag(args.ref, args.tag)
    _print(args, {"tag": args.tag, "ref": str(ref)}, [f"{args.tag} -> {ref}"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _ws(args).store
    ref = str(store.resolve(args.ref))
    out = args.output
    table = store.read(ref)
    if args.trl:
        from dpoflow.tasks.balance import to_trl

        table = to_trl(table)  # TRL's prompt / chosen / rejected (message lists for chats)
    if args.format == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out)
    elif args.format == "jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for batch in table.to_batches(max_chunksize=8192):
                for row in batch.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    else:
        import datasets

        datasets.Dataset(table).save_to_disk(out)
    _print(args, {"ref": ref, "output": str(out), "format": args.format, "rows": table.num_rows},
           [f"exported {ref} to {out} ({args.format})"])
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store = _ws(args).store
    removed = store.gc(keep_last=args.keep_last, dry_run=args.dry_run,
                       shard_max_age_s=args.shard_max_age_hours * 3600)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {name}@{','.join(map(str, vs))}" for name, vs in removed.items()] or ["nothing to remove"]
    _print(args, removed, lines)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = _ws(args).registry.list()
    lines = [f"{r['model_version']:<16} tags={','.join(r['tags']) or '-':<22} {r['created_at']}  "
             f"parents={','.join(r['parents']) or '-'}" for r in rows] or ["no models registered"]
    _print(args, rows, lines)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from dpoflow.flows.config import dump_config

    data = dump_config(_ws(args).config)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", default=argparse.SUPPRESS,
                        help="workspace folder (default ./dpoflow-workspace, or $DPOFLOW_WORKSPACE)")
    common.add_argument("--set", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="config override, e.g. --set train.beta=0.2 (repeatable)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    p = argparse.ArgumentParser(prog="dpoflow", description="Preference data and DPO retraining pipeline.",
                                parents=[common])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.common = common  # type: ignore[attr-defined]  # plugins reuse these parents
    sub.listing = listing  # type: ignore[attr-defined]

    s = sub.add_parser("import", parents=[common, listing], help="import a Parquet / JSONL / CSV file or folder as a dataset version")
    s.add_argument("name", help="dataset: prompts, served, feedback_events, annotations, pairs, ...")
    s.add_argument("file")
    s.add_argument("--force", action="store_true", help="import again even if the file is unchanged")
    s.add_argument("--replace", action="store_true",
                   help="replace the dataset's rows instead of adding to them (names the version replaced)")
    s.set_defaults(func=cmd_import)

    ds = sub.add_parser("datasets", help="list, inspect, tag, export and clean up datasets").add_subparsers(dest="sub", required=True)
    s = ds.add_parser("list", parents=[common, listing])
    s.add_argument("--all", action="store_true", help="also list internal shard_* datasets")
    s.set_defaults(func=cmd_list)
    s = ds.add_parser("show", parents=[common, listing])
    s.add_argument("ref", help="NAME[@VERSION|@TAG]")
    s.add_argument("--limit", type=int, default=5)
    s.set_defaults(func=cmd_show)
    s = ds.add_parser("log", parents=[common, listing])
    s.add_argument("name")
    s.set_defaults(func=cmd_log)
    s = ds.add_parser("lineage", parents=[common, listing])
    s.add_argument("ref")
    s.set_defaults(func=cmd_lineage)
    s = ds.add_parser("tag", parents=[common, listing])
    s.add_argument("ref")
    s.add_argument("tag")
    s.set_defaults(func=cmd_tag)
    s = ds.add_parser("export", parents=[common, listing])
    s.add_argument("ref")
    s.add_argument("--format", choices=["parquet", "jsonl", "hf"], default="parquet")
    s.add_argument("--output", required=True)
    s.add_argument("--trl", action="store_true",
                   help="only TRL's DPO columns (prompt, chosen, rejected; message lists for chat prompts)")
    s.set_defaults(func=cmd_export)
    s = ds.add_parser("gc", parents=[common, listing], help="delete unreferenced old versions")
    s.add_argument("--keep-last", type=int, default=3, help="newest versions of each dataset to keep")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--shard-max-age-hours", type=float, default=24.0,
                   help="remove stage work units (shard_* datasets) older than this")
    s.set_defaults(func=cmd_gc)

    ms = sub.add_parser("models", help="the model registry").add_subparsers(dest="sub", required=True)
    s = ms.add_parser("list", parents=[common, listing])
    s.set_defaults(func=cmd_models)

    cs = sub.add_parser("config", help="the pipeline config").add_subparsers(dest="sub", required=True)
    s = cs.add_parser("show", parents=[common, listing], help="print the effective config")
    s.set_defaults(func=cmd_config_show)

    for mod in PLUGINS:
        importlib.import_module(mod).register(sub)
    return p


def _one_line(exc: BaseException) -> str:
    """An error as one line: its message with line breaks folded (config errors list keys)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input or setup (exit 2); anything else is a fault (exit 1)."""
    from dpoflow.flows.config import ConfigError
    from dpoflow.flows.workspace import WorkspaceError
    from dpoflow.storage.schemas import DatasetNameError, SchemaError
    from dpoflow.storage.store import StoreError
    from dpoflow.tasks.importing import ImportError_
    from dpoflow.tasks.training.results import TrainingError

    return (StoreError, SchemaError, DatasetNameError, ConfigError, WorkspaceError, ImportError_,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, TrainingError, ValueError,
            KeyError)


@contextlib.contextmanager
def _exit_on_signals() -> Iterator[None]:
    """SIGTERM / SIGHUP end the command like Ctrl-C does: through the normal exit path, so
    what it started (Prefect's temporary server, a training process group) is stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Options are SUPPRESSed when absent, so one given before the subcommand survives it.
    args.workspace = getattr(args, "workspace", None)
    args.set = getattr(args, "set", None) or []
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _exit_on_signals():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dpoflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        user_error = isinstance(exc, _user_errors())
        hint = "" if user_error else f" ({type(exc).__name__}; run with --debug for the traceback)"
        print(f"dpoflow: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 2 if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
