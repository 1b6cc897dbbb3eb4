"""`dpoflow run STAGE`: what a run wrote is read back from the store by its flow-run id, runs are
named and tagged after their dataset versions, failures and a missing server are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dpoflow.flows.cli import main
from tests.builders import seed_pairs_inputs as _seed


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    clean.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **env)
    return subprocess.run([sys.executable, "-m", "dpoflow.flows.cli", *args], capture_output=True, text=True,
                          timeout=120, env=clean)


def test_run_deployment_without_a_server_is_one_line(tmp_path):
    ws = str(tmp_path / "ws")
    r = _cli(tmp_path, "run", "pairs", "--deployment", "--workspace", ws)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no Prefect server configured" in r.stderr and "PREFECT_API_URL" in r.stderr
    r = _cli(tmp_path, "run", "pairs", "--deployment", "--workspace", ws, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "no Prefect server answers at http://127.0.0.1:9/api" in r.stderr


def test_run_prints_what_it_wrote_from_the_store_and_labels_the_run(ws, prefect_harness, capsys):
    from prefect.client.orchestration import get_client

    _seed(ws, 8)
    assert main(["run", "pairs", "--workspace", str(ws.root), "--json"]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    (step,) = res["stages"]
    written = ws.store.info("pairs")
    # the outputs are the version this run committed (the commit names the run's id)
    assert res["state"] == "COMPLETED" and step["outputs"] == {"pairs": written.ref} and not step["skipped"]
    assert written.flow_run_id == res["id"] and step["rows"]["pairs"] == written.rows > 0
    assert set(step["inputs"].values()) == {"candidates@0", "scores@0", "judgements@0"}
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(res["id"])
    assert fr.name == res["name"] == "pairs <- candidates@0,judgements@0,scores@0"
    assert {"in:candidates@0", "in:scores@0", "in:judgements@0", f"out:{written.ref}"} <= set(fr.tags)

    # unchanged: reused outputs are printed too (nothing was committed by this run)
    assert main(["run", "pairs", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert f"unchanged -> reused {written.ref}" in out and ws.store.latest("pairs") == written.version


def test_a_failed_run_prints_its_state_message_and_exits_non_zero(ws, prefect_harness, capsys):
    # balance reads pairs@latest, and there are no pairs yet: the flow run fails inside
    assert main(["run", "balance", "--workspace", str(ws.root)]) == 1
    cap = capsys.readouterr()
    assert "balance run" in cap.out and "FAILED" in cap.out
    (line,) = cap.err.strip().splitlines()
    assert "ended FAILED" in line and "pairs" in line and "Traceback" not in cap.err
    assert not ws.store.exists("dpo_train")


def test_night_summary_links_each_stage_run_with_versions_rows_and_skips(ws, prefect_harness):
    from dpoflow.flows.balance import balance_flow
    from dpoflow.flows.nightly import night_summary
    from dpoflow.flows.pairs import pairs_flow

    _seed(ws, 8)
    p = pairs_flow(workspace=str(ws.root), return_state=True)
    b = balance_flow(workspace=str(ws.root), return_state=True)
    again = balance_flow(workspace=str(ws.root), return_state=True)  # unchanged: skipped
    ids = [str(s.state_details.flow_run_id) for s in (p, b, again)]
    out = {**p.result(), **b.result()}
    md = night_summary(ws, out, list(zip(["pairs", "balance", "balance"], ids, strict=True)), 3.2)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3
    pairs_rows = ws.store.info(out["pairs"]).rows
    assert rows[0].startswith("| pairs | ") and f"{out['pairs']} | pairs: {pairs_rows} |" in rows[0]
    assert "candidates@0" in rows[0] and rows[0].endswith("| no |")
    assert f"| {out['pairs']} | {out['dpo_eval']}, {out['dpo_train']} |" in rows[1]
    assert rows[2].endswith("| yes (unchanged) |") and ids[2][:8] in rows[2]
    assert "no training this night" in md


def test_nightly_run_is_named_after_its_date_in_the_configured_timezone(tmp_path, prefect_harness):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from prefect import flow
    from prefect.client.orchestration import get_client

    from dpoflow.flows.nightly import nightly_run_name

    root = tmp_path / "ws"
    root.mkdir()
    (root / "dpoflow.yaml").write_text("nightly:\n  timezone: Pacific/Kiritimati\n")  # UTC+14: another date

    @flow(flow_run_name=nightly_run_name)
    def night(workspace: str) -> str:
        from dpoflow.flows.reporting import flow_run_id

        return flow_run_id()

    days = {f"nightly-{datetime.now(ZoneInfo('Pacific/Kiritimati')).date()}"}
    run_id = night(str(root))
    days.add(f"nightly-{datetime.now(ZoneInfo('Pacific/Kiritimati')).date()}")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).name in days


def test_a_busy_prefect_api_is_a_transient_stage_error():
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from dpoflow.flows.nightly import is_transient

    def api_error(status: int) -> PrefectHTTPStatusError:
        request = httpx.Request("POST", "http://127.0.0.1:4291/api/task_runs/")
        response = httpx.Response(status, request=request, json={"exception_message": "x"})
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            return PrefectHTTPStatusError.from_httpx_error(exc)
        raise AssertionError("no error")

    assert is_transient(api_error(503)) and is_transient(api_error(429))  # SQLite busy, rate limit
    assert not is_transient(api_error(422)) and not is_transient(api_error(404))  # a bad request stays one
