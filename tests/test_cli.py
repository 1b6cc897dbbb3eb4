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
    for _ in range(4):
        run("import", "pairs", str(pairs_file), "--workspace", ws, "--force")
    code, out, _ = run("datasets", "gc", "--keep-last", "1", "--workspace", ws, "--json")
    assert code == 0 and json.loads(out) == {"pairs": [0, 1, 2], "quarantine": [0, 1, 2]}  # appends: @3 holds all
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
