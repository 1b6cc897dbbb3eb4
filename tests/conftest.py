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
from tests.builders import BUCKET, free_port  # noqa: E402


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


@pytest.fixture(scope="session")
def s3_env():
    """A real S3 API (moto server) on a loopback port, with a fresh bucket."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """(root, env) for a fresh store: a temp folder, or a fresh prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    env = request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{tmp_path.name}", env


@pytest.fixture
def restore_torch_threads():
    """Give back torch's thread count: a sampling stage sets cpu_threads in this process."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
