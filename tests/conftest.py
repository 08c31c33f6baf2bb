"""Shared fixtures: the demo model, one Ray + Serve per test session, OpenAI schema validation."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO_ROOT / "tests" / "openai_schema" / "openai-subset.json"  # vendored, MIT
BATCH_SCHEMA_FILE = REPO_ROOT / "tests" / "openai_schema" / "openai-files-batches.json"  # the same source, MIT
DEMO_KEY = "ember-test-key-0001"
ADMIN_TOKEN = "ember-test-admin-0001"
SIM_MODEL = "accounts/ember/models/demo-sim"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's proxy strips client control headers and answers in the OpenAI error shape, as under
# `make run` (the Ray processes started below inherit it).
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "deployments.proxy_guard:middlewares")
# Ray's processes push their metrics to the node's exporter every second, not every 10 s, so a
# test scrapes what it just did without a long wait.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Its per-key cap and body deadline (defaults 128 and 10 s), small enough for tests to reach.
os.environ.setdefault("EMBER_PROXY_MAX_PER_KEY", "64")
os.environ.setdefault("EMBER_PROXY_BODY_TIMEOUT_S", "5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from cluster.config import demo_model_dir
    from cluster.demo_model import build_demo_model

    return build_demo_model(demo_model_dir())


@pytest.fixture(scope="session")
def serve_instance(demo_model_dir):
    """Ray (on a port it picks, never Redis's 6379) and Serve on a free loopback port."""
    import ray
    from ray import serve

    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY
    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN_TOKEN
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def sim_config(**ingress) -> dict:
    return {
        "models": [
            {
                "id": SIM_MODEL,
                "context_length": 512,
                "tool_call_parser": "hermes",
                "num_replicas": 2,
                "resources": {"num_cpus": 0.1},
                "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": 8,
                           "cache_capacity_tokens": 8192},
            }
        ],
        "ingress": {"num_cpus": 0.1, "max_body_bytes": 65536, "max_completion_tokens": 256,
                    "max_n": 4, **ingress},
    }


@pytest.fixture(scope="session")
def sim_app(serve_instance) -> str:
    """Ember on SimEngine at the root route; returns the base URL of its OpenAI API."""
    from ray import serve

    from cluster.builder import build_app

    serve.run(build_app(sim_config()), name="sim", route_prefix="/")
    return serve_instance + "/v1"


@pytest.fixture()
def client(sim_app):
    import openai

    return openai.OpenAI(base_url=sim_app, api_key=DEMO_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def openai_schemas():
    """Validators for the official response schemas, by component name."""
    import jsonschema

    doc = json.loads(SCHEMA_FILE.read_text())
    doc["components"]["schemas"].update(json.loads(BATCH_SCHEMA_FILE.read_text())["components"]["schemas"])

    def validator(name: str, patch=None) -> "jsonschema.protocols.Validator":
        root = json.loads(json.dumps(doc)) if patch else doc
        if patch:
            patch(root["components"]["schemas"])
        schema = {**root, "$ref": f"#/components/schemas/{name}"}
        return jsonschema.Draft202012Validator(schema)

    return validator


SDK_SCHEMA_FILE = REPO_ROOT / "tests" / "openai_schema" / "openai-sdk-schemas.json"  # Apache-2.0


@pytest.fixture(scope="session")
def sdk_schemas():
    """Validators for the embeddings and Responses shapes, by root name: ``CreateEmbeddingResponse``,
    ``Response``, ``ResponseStreamEvent`` (tests/openai_schema/sdk_schemas.py made the file)."""
    import jsonschema

    doc = json.loads(SDK_SCHEMA_FILE.read_text())

    def validator(name: str) -> "jsonschema.protocols.Validator":
        return jsonschema.Draft202012Validator({"$defs": doc["$defs"], **doc["roots"][name]})

    return validator
