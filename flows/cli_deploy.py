"""`dpoflow serve` (all deployments + the nightly schedule from this machine) and
`dpoflow deploy check` (validate deploy/prefect.yaml offline)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _valid_timezone(tz: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"unknown timezone {tz!r} (use an IANA name like Europe/Berlin)") from exc
    return tz


def cmd_serve(args: argparse.Namespace) -> int:
    from dpoflow.flows.deployments import serve_all

    try:
        serve_all(args.workspace, cron=args.cron, timezone=args.timezone, schedule=not args.no_schedule,
                  names=args.only or None, overrides=args.set or None, limit=args.limit,
                  start_server=not args.no_server, server_home=args.server_home, port=args.port)
    except KeyboardInterrupt:
        pass
    except (ValueError, RuntimeError, OSError) as exc:  # bad schedule, no server, port taken, pool-owned names
        print(f"dpoflow serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_deploy_apply(args: argparse.Namespace) -> int:
    from dpoflow.flows.deployments import nightly_schedule
    from dpoflow.flows.local_server import configured_api_url
    from dpoflow.flows.prefect_yaml import REPO_PREFECT_YAML, apply_prefect_yaml, check_prefect_yaml

    if not configured_api_url():
        print("dpoflow deploy apply: error: no Prefect server configured: set PREFECT_API_URL", file=sys.stderr)
        return 2
    path = Path(args.file) if args.file else REPO_PREFECT_YAML
    problems = check_prefect_yaml(path)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    cron, timezone = nightly_schedule(args.workspace, args.set or None, args.cron, args.timezone)
    try:
        done = apply_prefect_yaml(path, cron=cron, timezone=timezone, create_pools=not args.no_create_pools)
    except (ValueError, RuntimeError) as exc:
        print(f"dpoflow deploy apply: error: {exc}", file=sys.stderr)
        return 2
    done += _offer_versions(args.workspace)
    if args.json:
        print(json.dumps({"file": str(path), "cron": cron, "timezone": timezone, "done": done}, indent=1))
    else:
        print("\n".join(done))
    return 0


def _offer_versions(workspace: str | None) -> list[str]:
    """The workspace's stored versions as choices in the new deployments' run forms."""
    from dpoflow.flows.version_choices import refresh_version_choices
    from dpoflow.flows.workspace import Workspace, WorkspaceError

    try:
        ws = Workspace.open(workspace, create=False)
    except WorkspaceError:
        return []  # no workspace here yet: the forms get their lists after the first run
    n = refresh_version_choices(ws.store, str(ws.root))
    return [f"listed the stored dataset versions in {n} deployment form(s)"] if n else []


def cmd_deploy_check(args: argparse.Namespace) -> int:
    from dpoflow.flows.prefect_yaml import REPO_PREFECT_YAML, check_prefect_yaml

    path = Path(args.file) if args.file else REPO_PREFECT_YAML
    problems = check_prefect_yaml(path)
    if args.json:
        print(json.dumps({"file": str(path), "problems": problems}, indent=1))
    else:
        print("\n".join(problems) if problems else f"{path}: all deployments valid")
    return 1 if problems else 0


def _schedule_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--cron", default=None,
                   help="nightly schedule (default: the config's nightly.cron, '0 2 * * *' = 02:00 every day)")
    s.add_argument("--timezone", type=_valid_timezone, default=None,
                   help="timezone of the cron schedule (default: the config's nightly.timezone, UTC)")


def register(sub) -> None:
    from dpoflow.flows.deployments import flow_specs

    common = getattr(sub, "common", None)
    listing = getattr(sub, "listing", None)
    parents = [p for p in (common,) if p is not None]
    s = sub.add_parser(
        "serve", parents=parents,
        help="serve every stage deployment and the nightly schedule from this machine",
        description="Serve the FLOW/serve deployments of all stage flows, `import` and `nightly` (with its "
                    "cron schedule) until Ctrl-C. Without PREFECT_API_URL, a local `prefect server start` "
                    "(SQLite, 127.0.0.1) is started first and its UI address printed. Never takes over "
                    "deployments a work pool runs (deploy/prefect.yaml's are named FLOW/workers).")
    _schedule_args(s)
    s.add_argument("--no-schedule", action="store_true", help="serve nightly without its schedule")
    s.add_argument("--only", action="append", choices=list(flow_specs()), metavar="NAME",
                   help="serve only these deployments (repeatable)")
    s.add_argument("--limit", type=int, default=None, help="max concurrent flow runs on this machine")
    s.add_argument("--no-server", action="store_true",
                   help="never start a local server (fail if no PREFECT_API_URL is set)")
    s.add_argument("--server-home", default=None,
                   help="folder of the local server's SQLite database and log (default <workspace>/.prefect-server)")
    s.add_argument("--port", type=int, default=None,
                   help="port of the local server (default 4200, or any free port if taken; 0 = any free port)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("deploy", help="Prefect deployment helpers").add_subparsers(dest="sub", required=True)
    c = d.add_parser("check", parents=[p for p in (common, listing) if p is not None],
                     help="validate deploy/prefect.yaml without a server")
    c.add_argument("--file", default=None, help="prefect.yaml to check (default: the repository's deploy/prefect.yaml)")
    if listing is None:
        c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_deploy_check)
    a = d.add_parser("apply", parents=[p for p in (common, listing) if p is not None],
                     help="prefect deploy deploy/prefect.yaml (FLOW/workers) with the config's nightly schedule",
                     description="Check deploy/prefect.yaml, create missing work pools (process type) and run "
                                 "`prefect deploy --all` on it with the nightly schedule from the workspace config "
                                 "(nightly.cron / nightly.timezone) or --cron / --timezone.")
    a.add_argument("--file", default=None, help="prefect.yaml to deploy (default: the repository's deploy/prefect.yaml)")
    _schedule_args(a)
    a.add_argument("--no-create-pools", action="store_true", help="do not create missing work pools")
    if listing is None:
        a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_deploy_apply)
