"""Stopping child processes the one way the project does it: SIGTERM, then SIGKILL after a grace
period (training launches, the local Prefect server, `dpoflow serve` in tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def terminate(proc: subprocess.Popen, grace_s: float = 10.0, *, group: bool = True) -> None:
    """SIGTERM `proc`'s process group (or `proc` alone), SIGKILL if it is still there after
    `grace_s`; returns once `proc` has exited."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
