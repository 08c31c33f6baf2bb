"""Fixtures for the fault suite; the harness itself is in harness.py."""

from __future__ import annotations

import shutil

import pytest

from tests.faults.harness import App, PrivateRedis


@pytest.fixture(scope="module")
def deploy(serve_instance):
    from ray import serve

    from cluster.builder import build_app

    names = []

    def _deploy(name: str, config: dict) -> App:
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        names.append(name)
        return App(name, f"{serve_instance}/{name}/v1", config)

    yield _deploy
    for n in names:
        serve.delete(n)


@pytest.fixture()
def private_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    r = PrivateRedis()
    r.start()
    yield r
    r.cleanup()


