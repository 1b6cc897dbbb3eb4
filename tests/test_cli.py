"""The `dpoflow` command line as a user runs it (a real subprocess for the entry point)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from dpoflow.flows.cli import main


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def pairs_file(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "首都？", "chosen": "北京", "rejected": "上海"},
            {"prompt": "missing rejected", "chosen": "x"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return f


def test_import_list_show_log_lineage_tag_export(tmp_path, pairs_file):
    ws = str(tmp_path / "ws")
    code, out, _ = run("import", "pairs", str(pairs_file), "--workspace", ws)
    assert code == 0 and "imported 2 of 3 rows into pairs@0" in out and "missing rejected" in out
    code, out, _ = run("--workspace", ws, "datasets", "list", "--json")  # option before the command
    listed = {r["name"]: r for r in json.loads(out)}
    assert listed["pairs"]["rows"] == 2 and listed["quarantine"]["rows"] == 1
    code, out, _ = run("datasets", "show", "pairs@0", "--workspace", ws, "--json")
    shown = json.loads(out)
    assert shown["ref"] == "pairs@0" and {r["chosen"] for r in shown["head"]} == {"4", "北京"}
    assert run("datasets", "tag", "pairs@0", "golden", "--workspace", ws)[0] == 0
    code, out, _ = run("datasets", "log", "pairs", "--workspace", ws, "--json")
    assert json.loads(out)[0]["tags"] == ["golden"]
    code, out, _ = run("datasets", "lineage", "pairs@golden", "--workspace", ws, "--json")
    assert json.loads(out) == {"ref": "pairs@0", "stage": "import:pairs", "parents": []}
    for fmt in ("parquet", "jsonl", "hf"):
        dest = tmp_path / f"out.{fmt}"
        assert run("datasets", "export", "pairs@golden", "--format", fmt, "--output", str(dest),
                   "--workspace", ws)[0] == 0
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 2
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    import datasets

    hf = datasets.load_from_disk(str(tmp_path / "out.hf"))
    assert set(hf.column_names) >= {"prompt", "chosen", "rejected"} and len(hf) == 2
    dest = tmp_path / "trl.parquet"
    assert run("datasets", "export", "pairs@0", "--trl", "--output", str(dest), "--workspace", ws)[0] == 0
    assert set(pq.read_table(dest).column_names) == {"prompt", "chosen", "rejected", "pair_id"}


def test_errors_are_messages_not_tracebacks(tmp_path, pairs_file):
    ws = str(tmp_path / "ws")
    code, _, err = run("import", "../etc", str(pairs_file), "--workspace", ws)
    assert code == 2 and "invalid dataset name" in err
    code, _, err = run("datasets", "show", "pairs@3", "--workspace", ws)
    assert code == 2 and "does not exist" in err
    code, _, err = run("import", "prompts", str(tmp_path / "nope.jsonl"), "--workspace", ws)
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit, match="has no input 'bogus'"):
        main(["run", "pairs", "--input", "bogus@1", "--workspace", ws])


def test_gc_and_models_list(tmp_path, pairs_file):
    ws = str(tmp_path / "ws")
    for i in range(4):  # four different files: imports add, so each writes a version
        f = tmp_path / f"pairs{i}.jsonl"
        f.write_text(pairs_file.read_text(encoding="utf-8").replace("2+2?", f"{i}+2?"), encoding="utf-8")
        assert run("import", "pairs", str(f), "--workspace", ws)[0] == 0
    code, out, _ = run("datasets", "gc", "--keep-last", "1", "--workspace", ws, "--json")
    # each import adds to the one before (its parent), so @3's lineage keeps them all
    assert code == 0 and "pairs" not in json.loads(out)
    code, out, _ = run("datasets", "show", "pairs", "--workspace", ws, "--json")
    assert json.loads(out)["rows"] == 5  # four "i+2?" pairs + the one they share
    code, out, _ = run("models", "list", "--workspace", ws, "--json")
    assert code == 0 and json.loads(out) == []


def test_console_script_entry_point(tmp_path):
    """The installed `dpoflow` command starts and prints its help (a real subprocess)."""
    res = subprocess.run([sys.executable, "-m", "dpoflow.flows.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for command in ("demo", "nightly", "run", "import", "datasets", "models", "metrics", "train", "serve",
                    "config"):
        assert command in res.stdout


@pytest.mark.parametrize("argv, needle", [
    (["datasets", "show", "prompts@²"], "invalid ref"),
    (["datasets", "export", "pairs@0", "--output", "/sys/dpoflow-test.parquet"], "/sys"),
    (["datasets", "export", "pairs@0", "--format", "jsonl", "--output", "{tmp}"], "directory"),
    (["datasets", "export", "pairs@0", "--format", "hf", "--output", "{file}"], ""),
    (["datasets", "export", "quarantine@0", "--trl", "--output", "{tmp}/q.parquet"], ""),
    (["config", "show", "--set", "train.beta=[1"], "override --set train.beta=[1"),
    (["config", "show", "--set", "train.max_steps=-5"], "override --set train.max_steps"),
    (["config", "show", "--set", "import.on_bad_rows=bogus"], "'quarantine' or 'fail'"),
    (["run", "pairs", "--input", "pairs@999"], "pairs@999"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, pairs_file, argv, needle):
    ws = str(tmp_path / "ws")
    assert run("import", "pairs", str(pairs_file), "--workspace", ws)[0] == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a.format(tmp=tmp_path, file=afile) for a in argv]
    code, out, err = run(*argv, "--workspace", ws)
    assert code in (1, 2), (out, err)
    assert err.startswith("dpoflow: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="invalid ref"):
        main(["datasets", "show", "prompts@²", "--workspace", str(tmp_path), "--debug"])


def test_an_environment_override_error_names_the_variable(tmp_path, monkeypatch):
    (tmp_path / "ws").mkdir()
    monkeypatch.setenv("DPOFLOW__TRAIN__BETA", "[1")
    code, _, err = run("config", "show", "--workspace", str(tmp_path / "ws"))
    assert code == 2 and "environment variable DPOFLOW__TRAIN__BETA" in err


def test_read_only_commands_on_a_missing_or_wrong_workspace_create_nothing(tmp_path):
    missing = tmp_path / "typo" / "ws"
    for argv in (["datasets", "list"], ["models", "list"], ["datasets", "show", "pairs"], ["config", "show"]):
        code, _, err = run(*argv, "--workspace", str(missing))
        assert code == 2 and "no workspace at" in err and err.count("\n") == 1
    assert not (tmp_path / "typo").exists()
    afile = tmp_path / "file"
    afile.write_text("")
    code, _, err = run("datasets", "list", "--workspace", str(afile))
    assert code == 2 and "is a file" in err


def test_json_is_honoured_by_tag_and_export(tmp_path, pairs_file):
    ws = str(tmp_path / "ws")
    run("import", "pairs", str(pairs_file), "--workspace", ws)
    code, out, _ = run("datasets", "tag", "pairs@0", "golden", "--workspace", ws, "--json")
    assert code == 0 and json.loads(out) == {"tag": "golden", "ref": "pairs@0"}
    code, out, _ = run("datasets", "export", "pairs@0", "--output", str(tmp_path / "p.parquet"), "--workspace", ws,
                       "--json")
    assert code == 0 and json.loads(out)["rows"] == 2


def test_python_dash_m_dpoflow():
    res = subprocess.run([sys.executable, "-m", "dpoflow", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: dpoflow" in res.stdout


def test_help_imports_no_data_or_ml_library():
    """`dpoflow --help` stays fast: it must not import pyarrow, pandas, deltalake, torch or Prefect."""
    code = ("import sys; from dpoflow.flows.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('pyarrow', 'pandas', 'deltalake', 'torch', 'prefect') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_terminated_cli_stops_the_temporary_prefect_server(tmp_path, sig):
    """The CLI runs the nightly through Prefect's temporary server (a child process); SIGTERM
    or SIGHUP to the CLI stops that server too. The night blocks on reading a named pipe set
    as its prompts inbox, so the CLI is surely inside the flow run when the signal comes."""
    import os
    import signal
    import time

    ws = tmp_path / "ws"
    ws.mkdir()
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    (ws / "dpoflow.yaml").write_text(f"nightly:\n  inbox:\n    prompts: {fifo}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "dpoflow", "--workspace", str(ws), "nightly"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        server: set[int] = set()
        while time.monotonic() < deadline and not server:
            time.sleep(1)
            server = _children(proc.pid)
            assert proc.poll() is None, proc.stderr.read()
        assert server, "the temporary server never started"
        time.sleep(3)  # into the flow run (blocked on the pipe)
        proc.send_signal(getattr(signal, sig))
        proc.wait(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(p) for p in server):
            time.sleep(0.5)
        assert not any(_alive(p) for p in server), "the temporary Prefect server outlived the CLI"
    finally:
        for p in _children(proc.pid) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
