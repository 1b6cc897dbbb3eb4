"""deploy/prefect.yaml validates offline; serve builds the right deployments; the GPU guard
serialises GPU work; the CLI rejects bad schedules. (The real-server test is test_deploy_server.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dpoflow.flows import gpu_slots, local_server
from dpoflow.flows.deployments import (
    CPU_POOL,
    GPU_POOL,
    POOL_ROUTE,
    SERVE_ROUTE,
    build_deployments,
    flow_specs,
)
from dpoflow.flows.gpu_slots import gpu_slot
from dpoflow.flows.prefect_yaml import REPO_PREFECT_YAML, check_prefect_yaml
from dpoflow.flows.registry import STAGES

RAW = yaml.safe_load(REPO_PREFECT_YAML.read_text())
FLOW_OF = {spec: name for name, spec in flow_specs().items()}
DEPLOYMENTS = {FLOW_OF[d["entrypoint"]]: d for d in RAW["deployments"]}  # flow name -> its deployment


def _module_exists(spec: str) -> bool:
    return importlib.util.find_spec(spec.partition(":")[0]) is not None


@pytest.fixture(scope="module")
def problems() -> list[str]:
    return check_prefect_yaml(REPO_PREFECT_YAML)


def test_prefect_yaml_covers_every_stage_with_the_stage_registry_entrypoints():
    assert RAW["deployments"] and len(DEPLOYMENTS) == len(RAW["deployments"]), "duplicate names"
    # one deployment per stage + nightly + import, nothing else, entrypoints as in flows/registry.py
    assert set(DEPLOYMENTS) == set(flow_specs()) == set(STAGES) | {"nightly", "import"}
    # FLOW/workers: never the names `dpoflow serve` registers (FLOW/serve)
    assert {d["name"] for d in RAW["deployments"]} == {POOL_ROUTE} != {SERVE_ROUTE}
    for name, dep in DEPLOYMENTS.items():
        assert dep["entrypoint"] == flow_specs()[name]
        assert dep["work_pool"]["name"] == (GPU_POOL if name in {"sample", "train", "nightly"} else CPU_POOL)
        assert set(dep["parameters"]) <= {"workspace", "overrides", "force"}
    # the nightly schedule: 02:00 every day, with an explicit timezone; no other schedules
    (sched,) = DEPLOYMENTS["nightly"]["schedules"]
    assert sched["cron"] == "0 2 * * *" and sched["timezone"]
    assert all(not d.get("schedules") for n, d in DEPLOYMENTS.items() if n != "nightly")


@pytest.mark.parametrize("name", list(flow_specs()))
def test_each_deployment_validates(problems, name):
    spec = flow_specs()[name]
    mine = [p for p in problems if p.startswith(f"deployment {name}/{POOL_ROUTE}:")]
    assert _module_exists(spec), f"{spec} does not import"
    assert mine == []
    assert not [p for p in problems if not p.startswith("deployment ")]  # file-level problems


def _mutated(tmp_path: Path, edit) -> list[str]:
    raw = yaml.safe_load(REPO_PREFECT_YAML.read_text())
    raw.pop("definitions")
    raw = json.loads(json.dumps(raw))  # YAML anchors load as shared dicts: unshare before editing
    deps = {FLOW_OF[d["entrypoint"]]: d for d in raw["deployments"]}
    edit(deps)
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(raw))
    return [p for p in check_prefect_yaml(path) if "does not load: No module named" not in p]


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda d: d["import"]["parameters"].update(batch_size=4), "['batch_size'] not in import's signature"),
    (lambda d: d["import"]["parameters"].update(force="sometimes"), "parameter force"),
    (lambda d: d["import"].update(entrypoint="dpoflow.flows.deployments:serve_all"), "does not load"),
    (lambda d: d["import"].update(entrypoint="dpoflow.flows.importing:no_such_flow"), "does not load"),
    (lambda d: d["import"]["work_pool"].update(name=GPU_POOL), "expected 'dpoflow-cpu'"),
    (lambda d: d["import"].pop("work_pool"), "work_pool.name is missing"),
    (lambda d: d["import"].update(schedules=[{"cron": "0 25 * * *"}]), "schedule"),
    (lambda d: d["import"].update(schedules=[{"cron": "0 2 * * *", "timezone": "Mars/Phobos"}]), "schedule"),
    # a scheduled run has nobody to type in the required parameters
    (lambda d: d["import"].update(schedules=[{"cron": "0 2 * * *"}]), "required"),
])
def test_checker_rejects_broken_deployments(tmp_path, edit, expect):
    found = _mutated(tmp_path, edit)
    assert any(expect in p for p in found), found
    assert all(p.startswith(("deployment import/workers:", "deployment workers:")) for p in found), found


def test_checker_accepts_the_unchanged_copy_and_rejects_garbage(tmp_path):
    assert _mutated(tmp_path, lambda d: None) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments: {not: a list}\n")
    assert check_prefect_yaml(bad) and "deployments" in check_prefect_yaml(bad)[0]
    bad.write_text("deployments: [\n")
    assert "cannot read" in check_prefect_yaml(bad)[0]


def test_build_deployments_pins_workspace_and_schedules_only_nightly(tmp_path):
    deps, missing = build_deployments(tmp_path / "ws", cron="30 3 * * 1-5", timezone="Europe/Berlin")
    assert {d.name for d in deps} == {SERVE_ROUTE}  # FLOW/serve: never the workers' FLOW/workers
    by_name = {d.flow_name: d for d in deps}
    assert "import" in by_name
    assert sorted(list(by_name) + [m.split(" ")[0] for m in missing]) == sorted(flow_specs())
    for name, d in by_name.items():
        assert d.parameters["workspace"] == str((tmp_path / "ws").resolve())
        assert d.entrypoint.startswith(flow_specs()[name].partition(":")[0])  # module path: cwd-independent
        assert ("gpu" in d.tags) == (name in {"sample", "train", "nightly"})
        if name == "nightly":
            (s,) = d.schedules
            assert s.schedule.cron == "30 3 * * 1-5" and s.schedule.timezone == "Europe/Berlin"
        else:
            assert not d.schedules
    deps, _ = build_deployments(tmp_path, names=["import"], overrides=["import.on_bad_rows=fail"])
    assert [d.flow_name for d in deps] == ["import"] and deps[0].parameters["overrides"] == ["import.on_bad_rows=fail"]
    with pytest.raises(ValueError, match="unknown deployment"):
        build_deployments(tmp_path, names=["nope"])
    with pytest.raises(ValueError):
        build_deployments(tmp_path, timezone="Mars/Phobos")
    with pytest.raises(ValueError):
        build_deployments(tmp_path, cron="61 * * * *")


def test_ensure_server_uses_a_configured_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with local_server.ensure_server() as url:  # must not start anything: nothing listens on port 9
        assert url == "http://127.0.0.1:9/api"


def test_flow_run_settings_trim_the_client_only_on_the_temporary_server(monkeypatch):
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = {PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}
    with temporary_settings(updates=server), local_server.flow_run_settings():
        s = get_current_settings()  # a real server uses heartbeats and may enforce CSRF
        assert s.flows.heartbeat_frequency == 30 and s.client.csrf_support_enabled
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}, restore_defaults={PREFECT_API_URL}):
        with local_server.flow_run_settings():
            s = get_current_settings()
            assert s.flows.heartbeat_frequency is None and not s.client.csrf_support_enabled
        assert get_current_settings().flows.heartbeat_frequency == 30


def test_gpu_slot_outside_a_flow_run_needs_no_server():
    ran = []
    with gpu_slot(device="cuda"):
        ran.append(1)
    assert ran == [1]


def test_gpu_slot_serialises_concurrent_gpu_flows(prefect_harness, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client

    limit = f"gpu-test-{time.monotonic_ns()}"
    monkeypatch.setenv(gpu_slots.GPU_LIMIT_ENV, limit)
    spans: list[tuple[float, float]] = []

    @flow
    def fake_gpu_stage() -> None:
        with gpu_slot(timeout_s=60, device="cuda"):
            t0 = time.monotonic()
            time.sleep(0.8)
            spans.append((t0, time.monotonic()))

    threads = [threading.Thread(target=fake_gpu_stage) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1 - 0.05, f"GPU blocks overlapped: {spans}"
    with get_client(sync_client=True) as client:
        gcl = client.read_global_concurrency_limit_by_name(limit)
    assert gcl.limit == 1 and gcl.active_slots == 0  # created on first use, released after


def test_gpu_slot_times_out_while_the_gpu_is_busy(prefect_harness, monkeypatch):
    from prefect import flow

    monkeypatch.setenv(gpu_slots.GPU_LIMIT_ENV, f"gpu-busy-{time.monotonic_ns()}")
    holding, release = threading.Event(), threading.Event()

    @flow
    def holder() -> None:
        with gpu_slot(device="cuda"):
            holding.set()
            release.wait(60)

    @flow
    def waiter(device: str = "cuda") -> str:
        try:
            with gpu_slot(timeout_s=1.5, device=device):
                return "got it"
        except TimeoutError:
            return "timed out"

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert holding.wait(60)
        assert waiter() == "timed out"
        # a stage running on CPU (its resolved device) has no GPU to wait for
        assert waiter(device="cpu") == "got it"
    finally:
        release.set()
        t.join(60)
    assert waiter() == "got it"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # a clean Prefect environment: no API URL from the harness or a user profile
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "dpoflow.flows.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_deploy_check_and_serve_argument_errors(tmp_path, capsys):
    from dpoflow.flows.cli import main

    bad = tmp_path / "prefect.yaml"
    raw = yaml.safe_load(REPO_PREFECT_YAML.read_text())
    for d in raw["deployments"]:
        if d["entrypoint"] == flow_specs()["import"]:
            d["parameters"] = {"nonsense": 1}
    bad.write_text(yaml.safe_dump(raw))
    assert main(["deploy", "check", "--file", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == str(bad) and any("nonsense" in p for p in out["problems"])
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--timezone", "Mars/Phobos"])
    assert exc.value.code == 2 and "unknown timezone" in capsys.readouterr().err
    # without any server configured, --no-server refuses instead of using a throwaway server
    r = _cli(tmp_path, "serve", "--no-server", "--no-schedule", "--only", "import", "--workspace", str(tmp_path))
    assert r.returncode == 2 and "PREFECT_API_URL" in r.stderr

DEPLOY_DIR = REPO_PREFECT_YAML.parent


def test_dockerfile_copies_what_exists_and_defaults_to_cpu_torch():
    text = (DEPLOY_DIR / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    root = DEPLOY_DIR.parent
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                if not src.endswith("*"):  # globs may match nothing (README.md*)
                    assert (root / src).exists(), f"Dockerfile copies missing {src}"
    # the module paths in prefect.yaml are importable from the packages the image installs
    packages = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    for dep in DEPLOYMENTS.values():
        namespace, top = dep["entrypoint"].split(".")[:2]
        assert namespace == "dpoflow" and {"dpoflow", top} <= packages


def test_k8s_gpu_job_template_is_consistent_and_renders():
    import re

    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    tmpl = json.loads((DEPLOY_DIR / "k8s-gpu-job-template.json").read_text())
    variables = tmpl["variables"]
    used = set(re.findall(r"{{\s*([\w]+)\s*}}", json.dumps(tmpl["job_configuration"])))
    assert used <= set(variables["properties"]), used - set(variables["properties"])
    defaults = {k: p["default"] for k, p in variables["properties"].items() if "default" in p}
    assert validate(defaults, variables, ignore_required=True) == []
    job = apply_values(tmpl["job_configuration"], {**defaults, "command": "prefect flow-run execute"})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "workspace", "mountPath": "/data"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dpoflow-workspace"
    assert container["env"]["DPOFLOW_WORKSPACE"] == "/data/dpoflow"


def test_nightly_schedule_and_concurrency_validate_against_a_nightly_shaped_flow(tmp_path, monkeypatch):
    """The nightly entry (cron, timezone, concurrency ENQUEUE, GPU pool) checked against a flow
    with nightly's signature, so this holds even before flows/nightly.py exists."""
    (tmp_path / "fake_nightly_mod.py").write_text(
        "from prefect import flow\n\n"
        "@flow(name='nightly')\n"
        "def nightly(workspace: str | None = None, overrides: list[str] | None = None, force: bool = False):\n"
        "    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def point(deps, **extra):
        deps["nightly"]["entrypoint"] = "fake_nightly_mod:nightly"
        for k, v in extra.items():
            deps["nightly"][k] = v
        return deps

    def nightly_problems(edit):
        return [p for p in _mutated(tmp_path, edit) if p.startswith("deployment nightly/workers:")]

    assert nightly_problems(lambda d: point(d)) == []
    bad = nightly_problems(lambda d: point(d, concurrency_limit={"limit": 1, "collision_strategy": "WAIT"}))
    assert bad and "not a valid deployment" in bad[0]
    bad = nightly_problems(lambda d: point(d, schedules=[{"cron": "0 2 * * *", "timezone": "Berlin"}]))
    assert bad and "schedule" in bad[0]
    bad = nightly_problems(lambda d: point(d, work_pool={"name": CPU_POOL}))
    assert bad and "expected 'dpoflow-gpu'" in bad[0]


_HOLDER = """
import sys, time
from prefect import flow
from dpoflow.flows.gpu_slots import gpu_slot

@flow
def hold_gpu() -> None:
    with gpu_slot(device="cuda"):
        print("holding", flush=True)
        time.sleep(600)

hold_gpu()
"""


def test_a_killed_holder_does_not_keep_the_gpu_slot(prefect_harness, monkeypatch, tmp_path):
    """SIGKILL a flow run that holds the GPU slot (the lease cannot be released by it), then
    a new run gets the slot at once, on the temporary server that revokes nothing by itself."""
    import signal

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    limit = f"gpu-killed-{time.monotonic_ns()}"
    monkeypatch.setenv(gpu_slots.GPU_LIMIT_ENV, limit)
    settings = get_current_settings()
    env = {**os.environ, gpu_slots.GPU_LIMIT_ENV: limit, "PREFECT_API_URL": str(settings.api.url),
           "PREFECT_HOME": str(settings.home), gpu_slots.GPU_LEASE_ENV: "600"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

        @flow
        def rerun() -> str:
            with gpu_slot(timeout_s=30, device="cuda"):
                return "got it"

        t0 = time.monotonic()
        assert rerun() == "got it"
        assert time.monotonic() - t0 < 30
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
        assert not [r for r in gpu_slots._leases_dir().glob("*.json") if f'"pid": {proc.pid},' in r.read_text()]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_nightly_schedule_comes_from_the_config_on_both_routes(tmp_path, monkeypatch):
    from dpoflow.flows.deployments import nightly_schedule
    from dpoflow.flows.prefect_yaml import with_schedule

    monkeypatch.delenv("DPOFLOW__NIGHTLY__TIMEZONE", raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    assert nightly_schedule(ws) == ("0 2 * * *", "UTC")  # defaults; nothing is created
    (ws / "dpoflow.yaml").write_text("nightly:\n  cron: '30 1 * * 1-5'\n  timezone: Europe/Berlin\n")
    assert nightly_schedule(ws) == ("30 1 * * 1-5", "Europe/Berlin")
    assert nightly_schedule(ws, cron="0 3 * * *") == ("0 3 * * *", "Europe/Berlin")  # the command line wins
    monkeypatch.setenv("DPOFLOW__NIGHTLY__TIMEZONE", "Asia/Shanghai")
    assert nightly_schedule(ws)[1] == "Asia/Shanghai"
    # the prefect.yaml route deploys a copy with that schedule (`prefect deploy --all` drops --timezone)
    raw = with_schedule(REPO_PREFECT_YAML, "30 1 * * 1-5", "Europe/Berlin")
    (nightly,) = [d for d in raw["deployments"] if d["entrypoint"] == flow_specs()["nightly"]]
    assert nightly["schedules"] == [{"cron": "30 1 * * 1-5", "timezone": "Europe/Berlin", "active": True}]
    assert [d for d in raw["deployments"] if d.get("schedules")] == [nightly]


def test_ui_links_use_the_servers_real_address(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert local_server.ui_url("http://127.0.0.1:4291/api") == "http://127.0.0.1:4291"
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4291/api"}):
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4291/api")
        assert local_server.flow_run_url("abc") == "http://127.0.0.1:4291/runs/flow-run/abc"
    monkeypatch.delenv("PREFECT_API_URL")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert local_server.flow_run_url("abc") is None  # the temporary server: nothing to link to


def test_k8s_template_named_in_prefect_yaml_exists():
    import re

    named = set(re.findall(r"deploy/(k8s-[\w.-]+)", REPO_PREFECT_YAML.read_text()))
    assert named == {"k8s-gpu-job-template.json"} and all((DEPLOY_DIR / n).exists() for n in named)


def test_run_forms_list_the_stored_versions_and_still_take_any_ref(tmp_path):
    import jsonschema

    from dpoflow.flows.version_choices import OTHER, with_version_choices
    from dpoflow.flows.workspace import Workspace
    from tests.builders import candidates

    ws = Workspace.open(tmp_path / "ws")
    for ids in (("c1",), ("c1", "c2"), ("c1", "c2", "c3")):
        candidates(ws, ids)
    ws.store.tag("candidates@1", "golden")
    by_name = {d.flow_name: d for d in build_deployments(ws.root)[0]}
    schema = by_name["pairs"]._parameter_openapi_schema.model_dump(mode="json")
    listed, other = schema["properties"]["candidates"]["anyOf"]
    assert listed["enum"] == ["candidates@latest", "candidates@2", "candidates@1", "candidates@0", "candidates@golden"]
    assert other == {"type": "string", "title": OTHER}  # a version written since the form was built
    scores = schema["properties"]["scores"]  # optional input, no version yet: a plain free-text field
    assert "enum" not in json.dumps(scores) and {"type": "null"} in scores["anyOf"]
    for ok in ({"candidates": "candidates@1"}, {"candidates": "candidates@7"}, {"scores": None}):
        jsonschema.validate(ok, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"candidates": 3}, schema)
    assert with_version_choices("pairs", schema, ws.store) == schema  # a refresh without news changes nothing
    assert "enum" not in json.dumps(by_name["nightly"]._parameter_openapi_schema.model_dump(mode="json"))
    ws.store.gc(keep_last=1)
    assert with_version_choices("pairs", schema, ws.store)["properties"]["candidates"]["anyOf"][0]["enum"] == [
        "candidates@latest", "candidates@2", "candidates@1", "candidates@golden"]  # gc kept the tagged one


def test_refresh_puts_new_versions_in_the_forms_on_the_server(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    from dpoflow.flows.version_choices import refresh_version_choices
    from dpoflow.flows.workspace import Workspace
    from tests.builders import candidates

    ws = Workspace.open(tmp_path / "ws")
    candidates(ws, ("c1",))
    (pairs,) = build_deployments(ws.root, names=["pairs"])[0]
    dep_id = pairs.apply()
    candidates(ws, ("c1", "c2"))  # written after the deployment was built
    assert refresh_version_choices(ws.store, str(ws.root)) == 1
    assert refresh_version_choices(ws.store, str(ws.root)) == 0  # nothing new: no update
    assert refresh_version_choices(ws.store, str(tmp_path / "other")) == 0  # another workspace's forms
    with get_client(sync_client=True) as client:
        schema = client.read_deployment(dep_id).parameter_openapi_schema
    assert schema["properties"]["candidates"]["anyOf"][0]["enum"] == [
        "candidates@latest", "candidates@1", "candidates@0"]
