"""Shared fixtures: a fresh workspace per test, the tiny local model, one Prefect test server."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from dpoflow.flows.workspace import Workspace  # noqa: E402


@pytest.fixture
def ws(tmp_path) -> Workspace:
    """An empty workspace (local store) in a temp folder."""
    return Workspace.open(tmp_path / "ws")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded default model (tokenizer + tiny Llama), built once per session."""
    from dpoflow.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    from dpoflow.tasks.tiny_model import build_tiny_classifier

    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_classifier"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (its first start migrates SQLite)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
