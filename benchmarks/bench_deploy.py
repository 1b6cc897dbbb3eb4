"""What `dpoflow serve` costs: local server start (cold = new SQLite database, warm = existing),
serve start until the deployments are registered, and the latency of a triggered stage run
(`import` of a small file) from `run_deployment` to completion.

    python benchmarks/bench_deploy.py [--runs 3] [--quick]

Everything runs in subprocesses with a private PREFECT_HOME under a temp folder; all are
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLIENT = """
import json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
t0 = time.perf_counter()
with get_client(sync_client=True) as c:
    while True:
        try:
            c.read_deployment_by_name("import/serve"); break
        except ObjectNotFound:
            time.sleep(0.2)
registered = time.perf_counter() - t0
lat = []
for i in range(int(sys.argv[2])):
    t = time.perf_counter()
    r = run_deployment("import/serve", parameters={"name": "prompts", "path": sys.argv[1], "force": True},
                       timeout=300, poll_interval=0.5)
    assert r.state.is_completed(), r.state
    lat.append(time.perf_counter() - t)
print("RESULT " + json.dumps({"registered_wait_s": registered, "latency_s": lat}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3, help="triggered runs to time")
    ap.add_argument("--quick", action="store_true", help="one run, no warm server restart")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    from dpoflow.flows.local_server import start_local_server
    from dpoflow.tasks.processes import terminate

    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="1")
    rows = []
    t = time.perf_counter()
    server = start_local_server(tmp / "server", port=0, env=env)
    rows.append(("local server start, new database (s)", time.perf_counter() - t))
    if not args.quick:
        server.stop()
        t = time.perf_counter()
        server = start_local_server(tmp / "server", port=0, env=env)
        rows.append(("local server start, existing database (s)", time.perf_counter() - t))
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i} 问题"}, ensure_ascii=False) + "\n"
                            for i in range(100)), encoding="utf-8")
    senv = {**env, "PREFECT_API_URL": server.api_url}
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115
    t = time.perf_counter()
    serve = subprocess.Popen([sys.executable, "-m", "dpoflow.flows.cli", "serve", "--workspace", str(tmp / "ws")],
                             env=senv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = subprocess.run([sys.executable, "-c", CLIENT, str(data), str(runs)], env=senv,
                                capture_output=True, text=True, timeout=600)
        if client.returncode:
            print(client.stderr[-3000:], (tmp / "serve.log").read_text()[-3000:], file=sys.stderr)
            return 1
        res = json.loads(client.stdout.split("RESULT ", 1)[1])
        served = re.search(r"(\d+) deployment\(s\)", (tmp / "serve.log").read_text())
        rows.append((f"serve start until deployments registered ({served.group(1) if served else '?'} flows) (s)",
                     time.perf_counter() - t - sum(res["latency_s"])))
        for i, lat in enumerate(res["latency_s"]):
            rows.append((f"import run {i + 1}: run_deployment -> completed (s)", lat))
    finally:
        terminate(serve, 30)
        server.stop()
        log.close()
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|------:|")
    for name, v in rows:
        print(f"| {name:<{width}} | {v:5.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
