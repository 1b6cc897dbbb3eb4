"""The house rules of the code base, checked from the source.

- The functional core (`tasks/`, `storage/`) never imports the Prefect shell (`flows/`) or
  Prefect, at module level or inside functions (an import-linter style contract over the AST).
- A stage's code version follows its imports: editing a core module re-runs exactly the
  stages whose modules reach it.
- The wheel installs one package, `dpoflow`, that works from a folder holding its own
  `flows/` and `tasks/`.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_DIRS = ("tasks", "storage")
FORBIDDEN = ("dpoflow.flows", "prefect", "flows")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_core_never_imports_the_shell_or_prefect():
    arrows = []
    for d in CORE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for line, name in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                    arrows.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert arrows == [], "core -> shell imports:\n" + "\n".join(arrows)


def test_direct_stage_runs_do_not_import_prefect(tmp_path):
    """`dpoflow train` and `dpoflow run STAGE` without --prefect call the stages directly; importing
    Prefect there would add 2-4 s and ~50 MB to every manual run (issue 18)."""
    code = ("import sys; from dpoflow.flows.registry import STAGES; from dpoflow.flows import cli; "
            "from dpoflow.flows.workspace import Workspace; Workspace.open(sys.argv[1]); "
            "[s.load('run') for s in STAGES.values() if s.name == 'train']; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')[:3])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ws")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_import_check_sees_function_level_imports(tmp_path):
    """The check above must catch the hidden kind of arrow (an import inside a function)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from dpoflow.flows.runner import run_stage\n")
    assert (2, "dpoflow.flows.runner") in _imports(p)


def _shim(tmp_path: Path) -> Path:
    """A copy of the package laid out as the wheel installs it: <shim>/dpoflow/{flows,tasks,storage}."""
    pkg = tmp_path / "shim" / "dpoflow"
    shutil.copytree(ROOT / "dpoflow", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for d in ("flows", "tasks", "storage"):
        shutil.copytree(ROOT / d, pkg / d, ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


_VERSIONS = textwrap.dedent("""
    import json, sys
    import dpoflow
    assert dpoflow.__file__.startswith(sys.argv[1]), dpoflow.__file__
    from dpoflow.flows.registry import STAGES
    from dpoflow.tasks.code_version import code_version, module_closure
    print(json.dumps({n: [code_version(s.core_module), "dpoflow.tasks.lang" in module_closure(s.core_module)]
                      for n, s in STAGES.items()}))
""")


def _versions(shim: Path) -> dict[str, list]:
    env = {**os.environ, "PYTHONPATH": str(shim.parent)}
    r = subprocess.run([sys.executable, "-c", _VERSIONS, str(shim)], capture_output=True, text=True,
                       env=env, cwd=shim.parent, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_editing_a_core_module_changes_the_code_version_of_exactly_the_stages_that_import_it(tmp_path):
    shim = _shim(tmp_path)
    before = _versions(shim)
    with open(shim / "tasks" / "lang.py", "a") as f:
        f.write("\n# an edit to language detection\n")
    after = _versions(shim)
    changed = {n for n in before if before[n][0] != after[n][0]}
    reaches_lang = {n for n, (_, uses) in before.items() if uses}
    assert {"score", "pairs"} <= reaches_lang  # scores and pairs detect languages
    assert changed == reaches_lang
    assert ("balance" in changed) == before["balance"][1]


def test_code_version_is_stable_when_nothing_changes(tmp_path):
    shim = _shim(tmp_path)
    assert _versions(shim) == _versions(shim)


@pytest.mark.slow
def test_wheel_installs_only_dpoflow_and_runs_beside_a_users_own_flows_and_tasks(tmp_path):
    """Build the wheel, install it (not editable) into a fresh venv that sees this venv's
    dependencies, and run the CLI and a stage from a folder with its own flows/ and tasks/."""
    dist, src = tmp_path / "dist", tmp_path / "src"  # a clean copy: no build/ left from earlier builds
    for d in ("dpoflow", "flows", "tasks", "storage"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("dpoflow-*.whl")
    import zipfile

    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("dpoflow-")}
    assert tops == {"dpoflow"}, tops

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    vpy = venv / "bin" / "python"
    # the outer venv's packages (torch, prefect, ...) without its editable dpoflow
    site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    vsite = subprocess.run([str(vpy), "-c", "import site; print(site.getsitepackages()[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    (Path(vsite) / "outer.pth").write_text(site + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", vsite, str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    work = tmp_path / "project"
    for d in ("flows", "tasks", "storage"):
        (work / d).mkdir(parents=True)
        (work / d / "__init__.py").write_text("raise ImportError('the user project, not dpoflow')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    where = subprocess.run([str(vpy), "-c", "import dpoflow, sys; print(dpoflow.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, timeout=120)
    assert where.returncode == 0 and where.stdout.startswith(vsite), (where.stdout, where.stderr)
    assert str(ROOT) not in where.stdout
    r = subprocess.run([str(vpy), "-m", "dpoflow", "--help"], cwd=work, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "usage: dpoflow" in r.stdout, r.stderr
    (work / "prompts.jsonl").write_text('{"prompt": "hello there"}\n{"prompt": "你好"}\n')
    r = subprocess.run([str(vpy), "-m", "dpoflow", "--workspace", "ws", "import", "prompts", "prompts.jsonl"],
                       cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(vpy), "-m", "dpoflow", "--workspace", "ws", "datasets", "list", "--json"],
                       cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "prompts" in r.stdout, r.stderr


def test_the_wheel_lists_every_package_folder():
    """pyproject maps `dpoflow.*` onto the top-level folders package by package: a new
    subpackage (a stage grown into a folder) must be listed there, or the wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"dpoflow"} | {
        "dpoflow." + ".".join(p.parent.relative_to(ROOT).parts)
        for d in ("flows", "tasks", "storage") for p in (ROOT / d).rglob("__init__.py")}
    assert found == listed, {"missing from pyproject": found - listed, "not a package": listed - found}
