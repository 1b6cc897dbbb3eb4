"""A Prefect server that can run schedules, and the settings flow runs use.

Prefect's temporary (ephemeral) server cannot run schedules, so when no ``PREFECT_API_URL`` is
configured `dpoflow serve` starts a real ``prefect server start`` (SQLite, loopback only) as a
child process, waits until it is healthy and points this process at it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def configured_api_url() -> str | None:
    """The API URL from the environment or the active Prefect profile, if any."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url or None


def ui_url(api_url: str | None = None) -> str | None:
    """The UI address of the server at `api_url` (default: the configured one); None on
    Prefect's temporary server, which has no UI worth linking to."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    api_url = api_url or configured_api_url()
    if not api_url:
        return None
    if settings.ui_url and api_url == settings.api.url:
        return settings.ui_url.rstrip("/")  # PREFECT_UI_URL (or Prefect's guess from the API URL)
    return api_url.rstrip("/").removesuffix("/api")


def flow_run_url(run_id: str) -> str | None:
    base = ui_url()
    return f"{base}/runs/flow-run/{run_id}" if base else None


_SETTINGS: dict[tuple[int, str], tuple[Any, Any]] = {}


def settings_context(updates: dict[Any, Any]) -> Any:
    """A Prefect ``SettingsContext`` = the current settings with ``updates``. The updated
    settings object is built once per (current settings, updates): rebuilding Prefect's
    settings costs ~50 ms, as much as a whole stage of the demo night, and the nightly
    flow enters this for every stage subflow."""
    from prefect.context import SettingsContext

    ctx = SettingsContext.get()
    if all(setting.value_from(ctx.settings) == value for setting, value in updates.items()):
        return contextlib.nullcontext()  # e.g. heartbeats already off (`flow_run_settings`): no copy at all
    key = (id(ctx.settings), repr(sorted((str(k), v) for k, v in updates.items())))
    if key not in _SETTINGS:
        if len(_SETTINGS) >= 32:  # a few distinct settings per process; never grow without bound
            _SETTINGS.clear()
        # the entry holds the base settings, so no other object can take over its id
        _SETTINGS[key] = (ctx.settings, ctx.settings.copy_with_update(updates=updates))
    return SettingsContext(profile=ctx.profile, settings=_SETTINGS[key][1])


def flow_run_settings() -> Any:
    """Prefect settings for flows started from this process (CLI, demo, benchmarks).

    With no server configured, Prefect runs flows against a temporary server that lives only
    as long as this process. There, and only there, two things are turned off:

    * flow heartbeats: they let a long-lived server mark runs whose process died as crashed;
      a temporary server dies with the process, so nothing acts on them, and each heartbeat
      thread still costs up to 1 s at the end of a flow;
    * the client's CSRF token fetch: the temporary server has CSRF protection off (Prefect's
      default), so each new client (one per task or subflow) paid a round trip for a 422.
    """
    if configured_api_url():
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    return settings_context({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False})


def free_port(preferred: int | None = None, host: str = "127.0.0.1", *, fallback: bool = True) -> int:
    """``preferred`` if it can be bound, else (with ``fallback``) any free port the OS gives us."""
    for candidate in ([preferred] if preferred else []) + ([0] if fallback or not preferred else []):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"port {preferred} on {host} is in use" if preferred else "no free port")


@dataclass
class LocalServer:
    """A ``prefect server start`` child process."""

    process: subprocess.Popen
    host: str
    port: int
    home: Path
    log_path: Path
    own_group: bool = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"prefect server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (its process group when it has one), SIGKILL after ``timeout_s``."""
        from dpoflow.tasks.processes import terminate

        terminate(self.process, timeout_s, group=self.own_group)


def start_local_server(home: str | os.PathLike[str], *, port: int | None = None, host: str = "127.0.0.1",
                       ui: bool = True, timeout_s: float = 180.0, env: dict[str, str] | None = None,
                       own_group: bool = True) -> LocalServer:
    """Start ``prefect server start`` on ``host`` (loopback by default) with its SQLite database,
    settings and log under ``home``; return once its API answers /health.

    ``own_group``: run it in a new session (stopping it stops all it spawned); with ``False``
    it stays in the caller's process group, so a Ctrl-C or a kill of that group (a supervisor
    stopping ``dpoflow serve``) takes the server down with the caller, never leaving it orphaned.
    ``port=None`` takes 4200 (Prefect's default, so bookmarks work) when free, else any port;
    ``port=0`` any free port; any other port exactly that one (``OSError`` when it is taken).
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = free_port(4200, host)
    else:
        port = free_port(port or None, host, fallback=False)
    child_env = {k: v for k, v in (env if env is not None else os.environ).items()
                 if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")}
    child_env.setdefault("PREFECT_HOME", str(home))
    child_env.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    child_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says.
    child_env["PREFECT_UI_API_URL"] = f"http://{host}:{port}/api"
    child_env["PREFECT_SERVER_API_HOST"], child_env["PREFECT_SERVER_API_PORT"] = host, str(port)
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
           "--ui" if ui else "--no-ui"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=own_group)
    server = LocalServer(proc, host, port, home, log_path, own_group)
    server.wait(timeout_s)
    return server


@contextlib.contextmanager
def ensure_server(home: str | os.PathLike[str] | None = None, port: int | None = None,
                  timeout_s: float = 180.0) -> Iterator[str]:
    """Yield the API URL of a Prefect server that can run schedules.

    A configured ``PREFECT_API_URL`` (environment or profile: a real server or Prefect Cloud)
    is used as is. Otherwise a local server is started under ``home`` (default
    ``~/.prefect/dpoflow-server``), this process (and the flow-run subprocesses it spawns)
    is pointed at it for the duration of the block, and it is stopped on exit.
    """
    url = configured_api_url()
    if url:
        yield url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = Path(home) if home else Path.home() / ".prefect" / "dpoflow-server"
    server = start_local_server(home, port=port, timeout_s=timeout_s, own_group=False)
    print(f"dpoflow: started a local Prefect server (SQLite at {home / 'prefect.db'}, log {server.log_path})\n"
          f"dpoflow: Prefect UI: {server.url}  (API {server.api_url})", flush=True)
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        server.stop()


