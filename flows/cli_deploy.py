"""`dpoflow serve` (all deployments + the nightly schedule from this machine) and
`dpoflow deploy check` (validate deploy/prefect.yaml offline)."""

from __future__ import annotations

import argparse
import json
import os
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

    cron = None if args.no_schedule else args.cron
    try:
        serve_all(args.workspace, cron=cron, timezone=args.timezone, names=args.only or None,
                  overrides=args.set or None, limit=args.limit, start_server=not args.no_server,
                  server_home=args.server_home, port=args.port)
    except KeyboardInterrupt:
        pass
    except (ValueError, RuntimeError, OSError) as exc:  # bad schedule, no server, port taken
        print(f"dpoflow serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_deploy_check(args: argparse.Namespace) -> int:
    from dpoflow.flows.prefect_yaml import REPO_PREFECT_YAML, check_prefect_yaml

    path = Path(args.file) if args.file else REPO_PREFECT_YAML
    problems = check_prefect_yaml(path)
    if args.json:
        print(json.dumps({"file": str(path), "problems": problems}, indent=1))
    else:
        print("\n".join(problems) if problems else f"{path}: all deployments valid")
    return 1 if problems else 0


def register(sub) -> None:
    from dpoflow.flows.deployments import DEFAULT_CRON, DEFAULT_TIMEZONE, flow_specs

    common = getattr(sub, "common", None)
    listing = getattr(sub, "listing", None)
    parents = [p for p in (common,) if p is not None]
    s = sub.add_parser(
        "serve", parents=parents,
        help="serve every stage deployment and the nightly schedule from this machine",
        description="Serve the deployments of all stage flows, `import` and `nightly` (with its cron "
                    "schedule) until Ctrl-C. Without PREFECT_API_URL, a local `prefect server start` "
                    "(SQLite, 127.0.0.1) is started first and its UI address printed.")
    s.add_argument("--cron", default=os.environ.get("DPOFLOW_CRON", DEFAULT_CRON),
                   help=f"nightly schedule (default {DEFAULT_CRON!r}: 02:00 every day; $DPOFLOW_CRON)")
    s.add_argument("--timezone", type=_valid_timezone,
                   default=os.environ.get("DPOFLOW_TIMEZONE", DEFAULT_TIMEZONE),
                   help=f"timezone of the cron schedule (default {DEFAULT_TIMEZONE}; $DPOFLOW_TIMEZONE)")
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
